"""The dataset the training loop consumes: a plan of batches per epoch, and the loading of one batch.

`Dataset.build(options)` scans and checks everything (no model needed, nothing written); `epoch_batches(epoch)`
is a pure function of (seed, epoch), so a run resumed at any step replays exactly the same batches, captions and
augmentations; `load_batch(spec)` does the I/O. Repeats and regularisation images are counted as sd-scripts
counts them, so step counts match what users know.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import BadInput
from . import buckets as B
from .augment import ColorShift, apply_color, choose_color, mirror, resize_and_crop, to_chw
from .cache import CacheJob, Encode, LatentCache
from .captions import CaptionRules, caption_variants, clean_caption, process_caption, tag_counts
from .options import DatasetOptions, bucket_range, check_options
from .plan import CAPTION, COLOR, CROP, FLIP, balance_reg_repeats, batch_count, epoch_order, held_out, item_rng
from .scan import ImageEntry, ScanResult, Skipped, scan_root, scan_subsets, scan_validation_dir

Size = tuple[int, int]


class _NoRandom:
    """Stands in for a stream when the caption rules draw nothing; drawing from it is a bug."""

    def random(self) -> float:
        raise AssertionError("caption rules drew a random number they do not need")

    def shuffle(self, x: list) -> None:
        raise AssertionError("caption rules shuffled without shuffle_caption")


_NO_RNG = _NoRandom()


@dataclass(frozen=True)
class Placed:
    """An image with its bucket and how often it is used per epoch (0: a reg image not needed)."""

    entry: ImageEntry
    choice: B.BucketChoice
    repeats: int
    role: str  # "train", "reg" or "validation"


@dataclass(frozen=True)
class ItemPlan:
    image: int  # index into Dataset.images
    repeat: int
    caption: str
    flip: bool
    crop: tuple[int, int]  # (left, top) in the resized, un-mirrored image
    color: ColorShift | None
    loss_weight: float


@dataclass(frozen=True)
class BatchSpec:
    """Everything needed to load one batch; small, hashable and picklable (DataLoader workers may load it)."""

    epoch: int  # 1-based; 0 for validation batches
    index: int  # position in the epoch
    bucket: Size  # (width, height)
    items: tuple[ItemPlan, ...]


@dataclass
class Batch:
    pixels: Any  # torch float32 (N, 3, H, W) in [-1, 1], or None when latents are cached
    latents: Any  # torch (N, C, H/f, W/f) as the encoder returned them, or None
    captions: list[str]
    loss_weights: Any  # torch float32 (N,): 1 for training images, prior_loss_weight for reg images
    original_sizes: list[tuple[int, int]]  # (height, width) of the image file (SDXL size conditioning)
    crop_top_lefts: list[tuple[int, int]]  # (top, left) of the crop in the resized (and mirrored) image
    target_sizes: list[tuple[int, int]]  # (height, width) of the bucket
    keys: list[str]
    flipped: list[bool]
    is_reg: list[bool]


def _place(entries: Sequence[ImageEntry], opts: DatasetOptions,
           skipped: list[Skipped]) -> list[tuple[ImageEntry, B.BucketChoice]]:
    resolution = opts.size
    steps = opts.bucket_reso_steps
    if not opts.enable_bucket:
        predefined = [resolution]
    elif not opts.bucket_no_upscale:
        lo, hi = bucket_range(opts)
        predefined = B.bucket_resolutions(resolution, lo, hi, steps)
    else:
        predefined = None
    placed = []
    for entry in entries:
        if predefined is not None:
            placed.append((entry, B.select_bucket(entry.size, predefined)))
            continue
        try:
            placed.append((entry, B.select_bucket_no_upscale(entry.size, resolution, steps)))
        except ValueError:
            w, h = entry.size
            skipped.append(Skipped(entry.path, f"too small ({w}x{h}) for bucket_reso_steps {steps} without upscaling"))
    return placed


class Dataset:
    """Built by `Dataset.build(options)`; see docs/dataset.md for the contract."""

    def __init__(self, options: DatasetOptions, images: Sequence[Placed], skipped: Sequence[Skipped],
                 ignored: Sequence[Skipped], num_reg_images: int):
        self.options = options
        self.seed = options.seed
        self.rules = CaptionRules.from_options(options)
        self.images: tuple[Placed, ...] = tuple(images)
        self.skipped = tuple(skipped)
        self.ignored = tuple(ignored)
        self.num_reg_images = num_reg_images  # reg images x their folder's repeats (sd-scripts' ss_num_reg_images)
        self.latents: LatentCache | None = None
        self._train_idx = [i for i, p in enumerate(self.images) if p.role != "validation" and p.repeats > 0]
        self._val_idx = [i for i, p in enumerate(self.images) if p.role == "validation"]

    # ---- building ---------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, options: DatasetOptions) -> "Dataset":
        """Scan, split, bucket and count. Raises BadInput (settings, missing folders, no usable image) before
        any model or pixel data is needed."""
        check_options(options)
        none = ScanResult((), (), ())
        ext = options.caption_extension
        if options.subsets:  # a dataset config: its folders, not train_data_dir / reg_data_dir (as sd-scripts)
            train_scan, reg_scan = scan_subsets(options.subsets, ext)
        else:
            train_scan = scan_root(options.train_data_dir, options.caption_extension)
            reg_scan = scan_root(options.reg_data_dir, ext, is_reg=True) if options.reg_data_dir else none
        val_scan = scan_validation_dir(options.validation_data_dir, ext) if options.validation_data_dir else none
        skipped = [*train_scan.skipped, *reg_scan.skipped, *val_scan.skipped]
        ignored = [*train_scan.ignored, *reg_scan.ignored, *val_scan.ignored]
        if not train_scan.images:
            if options.subsets:
                raise BadInput(_nothing_in_subsets(train_scan))
            raise BadInput(_nothing_to_train(options.train_data_dir, train_scan))
        if options.reg_data_dir and not reg_scan.images:
            ignored.append(Skipped(Path(options.reg_data_dir), "reg_data_dir holds no image in an N_concept folder"))
        if options.validation_data_dir and not val_scan.images:
            raise BadInput(f"validation_data_dir holds no readable image: {options.validation_data_dir}")

        train_entries: list[ImageEntry] = []
        val_entries: list[ImageEntry] = list(val_scan.images)
        val_seed = options.seed if options.validation_seed is None else options.validation_seed
        for concept in train_scan.concepts:
            out = held_out([e.key for e in concept.images], options.validation_split, val_seed, concept.folder.name)
            for i, entry in enumerate(concept.images):
                (val_entries if i in out else train_entries).append(entry)
        if options.validation_split > 0 and not val_entries:
            raise BadInput(
                f"validation_split {options.validation_split} holds out no image (each folder keeps "
                f"ceil(n x {1 - options.validation_split:g}) for training): raise it or use validation_data_dir"
            )

        train = _place(train_entries, options, skipped)
        reg = _place(reg_scan.images, options, skipped)
        val = _place(val_entries, options, skipped)
        if not train:
            where = options.train_data_dir or "the dataset config's subsets"
            raise BadInput(f"no usable image in {where} (all too small or held out)")
        num_train = sum(e.repeats for e, _ in train)
        reg_used = balance_reg_repeats(num_train, [e.repeats for e, _ in reg])
        images = [Placed(e, c, e.repeats, "train") for e, c in train]
        images += [Placed(e, c, n, "reg") for (e, c), n in zip(reg, reg_used)]
        images += [Placed(e, c, 1, "validation") for e, c in val]
        return cls(options, images, skipped, ignored, sum(e.repeats for e, _ in reg))

    # ---- counts and metadata ----------------------------------------------------------------------------------
    @property
    def num_train_images(self) -> int:
        """Training images x repeats (sd-scripts' ss_num_train_images; reg images not included)."""
        return sum(p.repeats for p in self.images if p.role == "train")

    @property
    def num_validation_images(self) -> int:
        return len(self._val_idx)

    @property
    def batches_per_epoch(self) -> int:
        sizes = self._bucket_sizes(self._train_idx, repeats=True)
        return batch_count(list(sizes.values()), self.options.train_batch_size)

    def _bucket_sizes(self, indices: Sequence[int], repeats: bool) -> dict[Size, int]:
        sizes: dict[Size, int] = {}
        for i in indices:
            bucket = self.images[i].choice.bucket
            sizes[bucket] = sizes.get(bucket, 0) + (self.images[i].repeats if repeats else 1)
        return sizes

    def bucket_info(self) -> dict:
        """`ss_bucket_info` (counts include repeats and balanced reg images; error over images in use)."""
        used = [self.images[i] for i in self._train_idx]
        return B.bucket_info([(p.choice.bucket, p.repeats) for p in used], [p.choice.ar_error for p in used])

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """`ss_tag_frequency`: {folder name: {tag: count}} over the training and reg captions (held-out excluded)."""
        captions: dict[str, list[str]] = {}
        for p in self.images:
            if p.role != "validation":
                captions.setdefault(p.entry.folder, []).append(p.entry.caption)
        return {folder: tag_counts(texts, self.rules) for folder, texts in captions.items()}

    def dataset_dirs(self, reg: bool = False) -> dict[str, dict[str, int]]:
        """`ss_dataset_dirs` (or `ss_reg_dataset_dirs` with reg=True): {folder: {"n_repeats", "img_count"}}."""
        role = "reg" if reg else "train"
        dirs: dict[str, dict[str, int]] = {}
        for p in self.images:
            if p.role == role:
                info = dirs.setdefault(p.entry.folder, {"n_repeats": p.entry.repeats, "img_count": 0})
                info["img_count"] += 1
        return dirs

    def caption_variants(self) -> frozenset[str] | None:
        """Every caption text training and validation can use, or None when captions shuffle or drop tags (then
        text-encoder outputs cannot be cached ahead)."""
        texts: set[str] = set()
        for p in self.images:
            variants = caption_variants(p.entry.caption, self.rules)
            if variants is None:
                return None
            texts |= variants if p.role != "validation" else {clean_caption(p.entry.caption, self.rules)}
        return frozenset(texts)

    # ---- planning ---------------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[BatchSpec]:
        """The batches of `epoch` (1-based), in training order; the same for the same (seed, epoch, dataset)."""
        if epoch < 1:
            raise ValueError(f"epochs count from 1, got {epoch}")
        groups: dict[Size, list[tuple[int, int]]] = {}
        for i in self._train_idx:
            placed = self.images[i]
            groups.setdefault(placed.choice.bucket, []).extend((i, r) for r in range(placed.repeats))
        order = epoch_order(groups, self.options.train_batch_size, self.seed, epoch)
        return [
            BatchSpec(epoch, n, bucket, tuple(self._plan_item(i, r, epoch) for i, r in items))
            for n, (bucket, items) in enumerate(order)
        ]

    def _plan_item(self, index: int, repeat: int, epoch: int) -> ItemPlan:
        opts, placed = self.options, self.images[index]
        key, seed = placed.entry.key, self.seed
        choice = placed.choice
        flip = bool(opts.flip_aug and item_rng(seed, epoch, key, repeat, FLIP).random() < 0.5)
        if opts.random_crop:
            room_x, room_y = B.crop_room(choice.resized, choice.bucket)
            rng = item_rng(seed, epoch, key, repeat, CROP)
            crop = (int(rng.integers(0, room_x + 1)), int(rng.integers(0, room_y + 1)))
        else:
            crop = B.center_crop(choice.resized, choice.bucket)
        color = choose_color(item_rng(seed, epoch, key, repeat, COLOR)) if opts.color_aug else None
        if self.rules.varies or self.rules.caption_dropout_rate > 0:
            rng = item_rng(seed, epoch, key, repeat, CAPTION)
            caption = process_caption(placed.entry.caption, self.rules, epoch, rng)
        else:  # nothing random: skip making a stream (epoch plans of large datasets stay fast)
            caption = process_caption(placed.entry.caption, self.rules, epoch, _NO_RNG)
        weight = float(opts.prior_loss_weight) if placed.role == "reg" else 1.0
        return ItemPlan(index, repeat, caption, flip, crop, color, weight)

    def validation_batches(self) -> list[BatchSpec]:
        """Held-out batches: every validation image once, no augmentation, captions as written; fixed order."""
        groups: dict[Size, list[int]] = {}
        for i in self._val_idx:
            groups.setdefault(self.images[i].choice.bucket, []).append(i)
        specs, size = [], self.options.train_batch_size
        for bucket in sorted(groups):
            members = groups[bucket]
            for start in range(0, len(members), size):
                items = tuple(
                    ItemPlan(i, 0, clean_caption(self.images[i].entry.caption, self.rules), False,
                             B.center_crop(self.images[i].choice.resized, bucket), None, 1.0)
                    for i in members[start : start + size]
                )
                specs.append(BatchSpec(0, len(specs), bucket, items))
        return specs

    # ---- loading ----------------------------------------------------------------------------------------------
    def load_pixels(self, item: ItemPlan):
        """The (3, H, W) float32 array in [-1, 1] for one planned item: decoded, resized, cropped, shifted, mirrored."""
        from ..imagefiles import open_image_rgb

        placed = self.images[item.image]
        img = open_image_rgb(placed.entry.path)
        img = resize_and_crop(img, placed.choice.resized, placed.choice.bucket, *item.crop)
        img = apply_color(img, item.color)
        if item.flip:
            img = mirror(img)
        return to_chw(img)

    def load_batch(self, spec: BatchSpec) -> Batch:
        """Pixels (or cached latents) and conditioning for one planned batch."""
        import torch

        cached = self.latents is not None and all(it.image in self.latents for it in spec.items)
        if cached:
            latents = torch.stack([self.latents.get(it.image, it.flip) for it in spec.items])
            pixels = None
        else:
            pixels = torch.stack([torch.from_numpy(self.load_pixels(it)) for it in spec.items])
            latents = None
        bw, bh = spec.bucket
        tops_lefts = []
        for it in spec.items:
            left, top = it.crop
            if it.flip:
                left = B.flipped_left(left, self.images[it.image].choice.resized, spec.bucket)
            tops_lefts.append((top, left))
        entries = [self.images[it.image].entry for it in spec.items]
        return Batch(
            pixels=pixels,
            latents=latents,
            captions=[it.caption for it in spec.items],
            loss_weights=torch.tensor([it.loss_weight for it in spec.items], dtype=torch.float32),
            original_sizes=[(e.size[1], e.size[0]) for e in entries],
            crop_top_lefts=tops_lefts,
            target_sizes=[(bh, bw)] * len(spec.items),
            keys=[e.key for e in entries],
            flipped=[it.flip for it in spec.items],
            is_reg=[e.is_reg for e in entries],
        )

    # ---- caches -----------------------------------------------------------------------------------------------
    def cache_latents(self, encode: Encode, encoder_id: str, batch_size: int | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      should_stop: Callable[[], bool] | None = None) -> LatentCache:
        """Encode every image in use once (plus its mirror with flip_aug) so batches carry latents; afterwards the
        VAE is no longer needed. `encoder_id` names the VAE (e.g. its hash): latents of another VAE never match.
        When `should_stop()` says so between VAE batches the returned cache has `stopped` set and the dataset keeps
        no partial cache (files already written on disk stay valid for the next run)."""
        opts = self.options
        if opts.color_aug or opts.random_crop:
            raise BadInput("cache_latents cannot be combined with color_aug or random_crop")
        cache = self.latents or LatentCache(opts.cache_latents_to_disk, opts.latents_cache_dir)
        jobs = []
        for i in self._train_idx + self._val_idx:
            p = self.images[i]
            crop = B.center_crop(p.choice.resized, p.choice.bucket)
            jobs.append(CacheJob(i, p.entry.path, p.choice.bucket, p.choice.resized, crop,
                                 bool(opts.flip_aug and p.role != "validation")))
        def load(job: CacheJob):
            item = ItemPlan(job.index, 0, "", False, job.crop, None, 1.0)
            return self.load_pixels(item)

        cache.fill(jobs, encode, encoder_id, load, batch_size or opts.train_batch_size, progress, should_stop)
        if not cache.stopped:
            self.latents = cache
        return cache

    def drop_latents(self) -> None:
        """Forget cached latents held in memory (pause); load_batch falls back to pixels until cached again."""
        if self.latents is not None:
            self.latents.clear()
        self.latents = None

    # ---- summary ----------------------------------------------------------------------------------------------
    def summary_lines(self) -> list[str]:
        """What a dry run shows: images per folder, repeats, captions missing, buckets, skipped files, counts."""
        lines = []
        folders: dict[tuple[str, str], list[Placed]] = {}
        for p in self.images:
            folders.setdefault((p.role, p.entry.folder), []).append(p)
        for (role, folder), members in folders.items():
            missing = sum(p.entry.caption_missing for p in members)
            uses = sum(p.repeats for p in members)
            text = f"{role:<10} {folder}: {len(members)} image{'s' if len(members) != 1 else ''}"
            if role == "train":
                text += f" x {members[0].entry.repeats} repeats = {uses}"
            elif role == "reg":
                text += f" (repeats {members[0].entry.repeats}, balanced to {uses} uses per epoch)"
            if missing:
                fallback = members[0].entry.concept
                text += f"; {missing} without caption file (caption: {fallback!r})"
            lines.append(text)
        info = self.bucket_info()
        for bucket in info["buckets"].values():
            w, h = bucket["resolution"]
            lines.append(f"bucket {w}x{h}: {bucket['count']} uses per epoch")
        lines.append(
            f"{self.num_train_images} training images with repeats, {self.num_reg_images} reg images with repeats, "
            f"{self.num_validation_images} validation images, {self.batches_per_epoch} batches per epoch "
            f"at batch size {self.options.train_batch_size}"
        )
        for s in self.skipped:
            lines.append(f"skipped {s.path}: {s.reason}")
        for s in self.ignored:
            lines.append(f"ignored {s.path}: {s.reason}")
        return lines


def _nothing_to_train(root: Any, scan: ScanResult) -> str:
    if scan.skipped:
        first = scan.skipped[0]
        return f"no readable image in {root}: {len(scan.skipped)} skipped (first: {first.path.name}: {first.reason})"
    if scan.ignored:
        return f"no N_concept folder with images in {root} ({scan.ignored[0].path.name}: {scan.ignored[0].reason})"
    if scan.concepts:
        return f"no images in the concept folders of {root} (png, jpg, jpeg, webp, bmp)"
    return f"train_data_dir is empty: {root} (put images in a folder named N_concept, e.g. 10_mychar)"


def _nothing_in_subsets(scan: ScanResult) -> str:
    if scan.skipped:
        first = scan.skipped[0]
        return (f"no readable image in the dataset config's training subsets: {len(scan.skipped)} skipped "
                f"(first: {first.path}: {first.reason})")
    return ("no training image in the dataset config's subsets (images must lie directly in each image_dir; "
            "is_reg subsets alone cannot train)")
