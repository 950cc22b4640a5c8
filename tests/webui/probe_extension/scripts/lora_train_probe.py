"""Test-only webui extension (linked as `zz-lora-train-probe` by tests/webui/webui_process.py next to the real one,
never shipped): routes that look inside the running webui, where the integration tests cannot reach over HTTP.

- GET  /lora-train-probe/digest: a hash of every tensor of the loaded model (values, dtype, device, requires_grad)
  plus the leftovers a training could forget (instance `forward`s, hooks, `.training` flags, SDXL embedders'
  `is_trainable`), so "restored bit-exactly" is checked on the weights themselves, not on an 8-bit image.
- POST /lora-train-probe/consistency {"lora": path, "scale_up": 30, "name", "prompt", "width", "height", "crop",
  "clip_skip", "max_tokens"}: the same prompt and noisy latent through our LdmBackend (what training computes) and
  through the webui's own path (`get_learned_conditioning` + `apply_model`, what generation computes), on the bare
  model, then with the LoRA (its ups x scale_up, saved as `<name>.safetensors`) applied by our network and by the
  webui's built-in Lora loader; plus our noising + target + loss against ldm's `p_losses` (SD1/SD2) or sgm's
  denoiser (SDXL). Answers the largest differences and the size of the LoRA's effect, so a naming, scale, MHA,
  v-prediction or size-conditioning mismatch shows as a number.

The webui's own opts (`sdxl_crop_top/left`, `CLIP_stop_at_last_layers`) are set for the call and put back.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from modules import script_callbacks


def _digest(sd_model) -> dict:
    import torch

    h = hashlib.sha256()
    for name, tensor in sd_model.state_dict(keep_vars=True).items():
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{t.device}|{tuple(t.shape)}|{getattr(tensor, 'requires_grad', False)}".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    forwards = sorted(n for n, m in sd_model.named_modules() if "forward" in m.__dict__)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in sd_model.modules())
    training = sorted(n for n, m in sd_model.named_modules() if m.training)
    trainable = [bool(getattr(e, "is_trainable", False)) for e in getattr(getattr(sd_model, "conditioner", None),
                                                                          "embedders", [])]
    return {"sha256": h.hexdigest(), "instance_forwards": forwards, "hooks": hooks, "training_modules": len(training),
            "embedders_trainable": trainable}


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def _webui_cond(sd_model, prompt: str, width: int, height: int):
    from modules import prompt_parser

    return sd_model.get_learned_conditioning(prompt_parser.SdConditioning([prompt], width=width, height=height))


def _compare(sd_model, backend, req: dict, x, t, noise) -> dict:
    """Our conditioning / prediction / loss against the webui's, for whatever weights and LoRA are active now."""
    import torch

    from lib_lora.train.loss import add_noise, per_sample_mse, target_for

    w, h, (top, left) = req["width"], req["height"], req["crop"]
    with torch.no_grad():
        ours_cond = backend.encode_prompts([req["prompt"]], clip_skip=req["clip_skip"], max_tokens=req["max_tokens"],
                                           sizes=[h, w, top, left, h, w])
        theirs_cond = _webui_cond(sd_model, req["prompt"], w, h)
        ours_eps = backend.predict(x, t, ours_cond)
        theirs_eps = sd_model.apply_model(x, t, theirs_cond)
        out = {"eps": ours_eps, "crossattn": ours_cond.crossattn}
        theirs_crossattn = theirs_cond["crossattn"] if isinstance(theirs_cond, dict) else theirs_cond
        out["crossattn_diff"] = _max_diff(ours_cond.crossattn, theirs_crossattn)
        out["eps_diff"] = _max_diff(ours_eps, theirs_eps)
        if isinstance(theirs_cond, dict):
            out["vector"] = backend.sdxl_vector(ours_cond, x)
            out["vector_diff"] = _max_diff(out["vector"], theirs_cond["vector"])
        # training's noising + target + loss against the model's own: ldm's p_losses (SD1/SD2, eps or v), sgm's
        # denoiser (SDXL: the timestep index and scaling its sampler uses)
        ac = backend.alphas_cumprod
        noisy = add_noise(x, noise, t, ac)
        pred = backend.predict(noisy, t, ours_cond)
        if hasattr(sd_model, "p_losses"):
            ldm_loss, _ = sd_model.p_losses(x, theirs_cond, t, noise=noise)
            ours_loss = per_sample_mse(pred, target_for(backend.prediction_type, x, noise, t, ac)).mean()
            out["loss_diff"] = abs(float(ours_loss) - float(ldm_loss))
        else:
            a = ac[t].view(-1, 1, 1, 1)
            if backend.prediction_type == "epsilon":
                x0_hat = (noisy - (1 - a).sqrt() * pred) / a.sqrt()
            else:
                x0_hat = a.sqrt() * noisy - (1 - a).sqrt() * pred
            sigma = ((1 - a) / a).sqrt()
            denoised = sd_model.denoiser(sd_model.model, x + sigma * noise, sigma.view(-1), theirs_cond)
            out["denoised_diff"] = _max_diff(x0_hat, denoised)
    return out


def _diffs(result: dict) -> dict:
    return {k: v for k, v in result.items() if k.endswith("_diff")}


def _vae(sd_model, backend, req: dict) -> dict:
    """Our latents (the mean, as cached for training) and decode against the webui's first stage."""
    import torch

    gen = torch.Generator().manual_seed(5)
    pixels = (torch.rand((1, 3, req["height"], req["width"]), generator=gen) * 2 - 1).to(backend.device)
    with torch.no_grad():
        ours = backend.encode_images(pixels, sample=False)
        if hasattr(sd_model, "conditioner"):  # sgm's inference wrapper samples; its parent class gives the mean
            fsm = sd_model.first_stage_model
            theirs = type(fsm).__mro__[1].encode(fsm, pixels).mode() * sd_model.scale_factor
        else:
            theirs = sd_model.get_first_stage_encoding(sd_model.encode_first_stage(pixels).mode())
        decoded = backend.decode_latents(ours)
        theirs_decoded = sd_model.decode_first_stage(ours).clamp(-1, 1)
    return {"encode_diff": _max_diff(ours, theirs), "decode_diff": _max_diff(decoded, theirs_decoded),
            "latent_std": float(ours.std())}


def _consistency(body: dict) -> dict:
    import torch
    from modules import call_queue, devices, shared

    from lib_lora.backends import LdmBackend
    from lib_lora.network import LoraNetwork, NetworkConfig, load_lora, save_lora
    from lib_lora.webui.model import clear_builtin_networks, loaded_model

    networks = sys.modules["networks"]
    req = {"prompt": body.get("prompt", "a photo of sks, red"), "width": int(body.get("width", 96)),
           "height": int(body.get("height", 64)), "crop": tuple(body.get("crop", (8, 16))),
           "clip_skip": int(body.get("clip_skip", 1)), "max_tokens": int(body.get("max_tokens", 75))}
    scale_up = float(body.get("scale_up", 1.0))
    saved_opts = {k: getattr(shared.opts, k) for k in ("sdxl_crop_top", "sdxl_crop_left", "CLIP_stop_at_last_layers")}
    with call_queue.queue_lock:
        shared.opts.sdxl_crop_top, shared.opts.sdxl_crop_left = req["crop"]
        shared.opts.CLIP_stop_at_last_layers = req["clip_skip"]
        try:
            sd_model = loaded_model()
            clear_builtin_networks(sd_model)
            backend = LdmBackend(sd_model, device=devices.device)
            gen = torch.Generator().manual_seed(3)
            shape = (1, 4, req["height"] // 8, req["width"] // 8)
            x = torch.randn(shape, generator=gen).to(devices.device)
            noise = torch.randn(shape, generator=gen).to(devices.device)
            t = torch.tensor([400], device=devices.device)
            bare = _compare(sd_model, backend, req, x, t, noise)
            vae = _vae(sd_model, backend, req)

            tensors, metadata = load_lora(body["lora"])
            path = body["lora"]
            if scale_up != 1.0:  # a stronger copy of the file, so a mismatch cannot hide under a small effect
                tensors = {k: (v.float() * scale_up if k.endswith("lora_up.weight") else v) for k, v in tensors.items()}
                path = save_lora(f"{shared.cmd_opts.lora_dir}/{body.get('name', 'lora-train-probe')}.safetensors",
                                 tensors, metadata, precision="fp32")
            net = LoraNetwork.from_kohya(backend.lora_targets(NetworkConfig(conv_dim=4)), tensors)
            with net.inject():
                ours = _compare(sd_model, backend, req, x, t, noise)
            networks.list_available_networks()
            stem = Path(path).stem
            networks.load_networks([stem], [1.0], [1.0], [None])
            try:
                loaded = [n.name for n in networks.loaded_networks]
                theirs = _compare(sd_model, backend, req, x, t, noise)
            finally:
                clear_builtin_networks(sd_model)
            after = _compare(sd_model, backend, req, x, t, noise)
        finally:
            for key, value in saved_opts.items():
                setattr(shared.opts, key, value)
    lora_vs = {k: _max_diff(ours[k], theirs[k]) for k in ("eps", "crossattn", "vector") if k in ours}
    return {
        "arch": backend.arch, "prediction": backend.prediction_type, "webui_loaded": loaded,
        "webui_sd_version": networks.available_networks[stem].sd_version.name, "modules": len(net.names()),
        "bare": _diffs(bare), "vae": vae,
        "with_lora": _diffs(ours),
        "ours_vs_webui_with_lora": lora_vs,
        "lora_effect": {k: _max_diff(ours[k], bare[k]) for k in lora_vs},
        "webui_lora_effect": {k: _max_diff(theirs[k], bare[k]) for k in lora_vs},
        "after_clear_vs_bare": {k: _max_diff(after[k], bare[k]) for k in lora_vs},
    }


def _on_app_started(_demo, app) -> None:
    from fastapi import Body

    from lib_lora.webui.model import loaded_model

    @app.get("/lora-train-probe/digest")
    def digest():
        return _digest(loaded_model())

    @app.post("/lora-train-probe/consistency")
    def consistency(body: dict = Body(...)):
        return _consistency(body)


script_callbacks.on_app_started(_on_app_started)
