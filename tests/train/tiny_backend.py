"""A small Backend over the tiny diffusers components of tests/fixtures (real models, real VAE and CLIP), for
driving the training loop in tests until `lib_lora.backends.DiffusersBackend` is merged.

It implements what docs/architecture.md's Backend contract says the loop uses, nothing more: arch,
prediction_type, alphas_cumprod, device, encode_images, encode_prompts, predict, lora_targets,
prepare_for_training / restore (exact), sample.
"""

from __future__ import annotations

import torch


class TinyDiffusersBackend:
    def __init__(self, parts: dict, arch: str = "sd1"):
        self.parts = parts
        self.unet, self.vae, self.te, self.tokenizer = parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"]
        self.arch = arch
        self.prediction_type = parts["scheduler"].config.prediction_type
        self.alphas_cumprod = parts["scheduler"].alphas_cumprod.float()
        self.device = torch.device("cpu")
        self.text_encoders = {"lora_te": self.te}
        self.vae_id = f"tiny-{arch}"
        self.model_name = "tiny-sd1"
        self._saved = None
        self.calls = {"prepare": 0, "restore": 0}

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist
            return dist.sample() * self.vae.config.scaling_factor

    def encode_prompts(self, texts, clip_skip=None, max_tokens=None, sizes=None):
        ids = self.tokenizer(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = self.te(ids.to(self.device), output_hidden_states=True)
        if clip_skip and clip_skip > 1:
            return self.te.text_model.final_layer_norm(out.hidden_states[-clip_skip])
        return out.last_hidden_state

    def predict(self, noisy, t, cond):
        return self.unet(noisy, t, encoder_hidden_states=cond).sample

    def lora_targets(self, cfg):
        from lib_lora.network import text_encoder_targets, unet_targets

        return unet_targets(self.unet, self.arch, cfg) + text_encoder_targets(self.te, "lora_te", cfg)

    def _modules(self):
        return {"unet": self.unet, "vae": self.vae, "te": self.te}

    def prepare_for_training(self, train_unet=True, train_text_encoder=True, gradient_checkpointing=False, mixed_precision="no"):
        if self._saved is None:
            self._saved = {
                name: ([m.training for m in mod.modules()], [p.requires_grad for p in mod.parameters()])
                for name, mod in self._modules().items()
            }
        for mod in self._modules().values():
            mod.requires_grad_(False)
        self.te.train(bool(train_text_encoder))
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.calls["prepare"] += 1

    def restore(self):
        if self.unet.is_gradient_checkpointing:
            self.unet.disable_gradient_checkpointing()
        if self._saved is not None:
            for name, mod in self._modules().items():
                modes, grads = self._saved[name]
                for m, mode in zip(mod.modules(), modes):
                    m.training = mode
                for p, g in zip(mod.parameters(), grads):
                    p.requires_grad_(g)
            self._saved = None
        self.calls["restore"] += 1

    def sample(self, prompt, negative_prompt="", width=64, height=64, steps=2, scale=7.5, seed=0, sampler="ddim"):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.te, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=DDIMScheduler.from_config(self.parts["scheduler"].config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return pipe(prompt, negative_prompt=negative_prompt or None, width=64, height=64, num_inference_steps=min(steps, 2),
                        guidance_scale=scale, generator=gen).images[0]
