// LoRA Train tab: what gradio cannot do by itself. Works in the webui (gradioApp) and in the standalone page.
(function () {
    function root() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }
    function el(id) {
        return root().querySelector("#" + id);
    }
    function visible(node) {
        return node && node.offsetParent !== null;
    }
    function numberIn(id) {
        var box = el(id);
        var input = box && box.querySelector("input");
        var v = input ? parseFloat(input.value) : NaN;
        return isFinite(v) && v > 0 ? v : NaN;
    }

    // Live step count: images x repeats (from the server) / batch / accumulation x epochs, as the user types.
    // Same arithmetic and words as lib_lora.train.steps (plan_steps, StepPlan.epochs_text; the tab has no
    // max_train_steps field, so no partial epoch here): the server's answer replaces it.
    function updateSteps() {
        var line = el("lora_train_steps_line");
        var info = line && line.querySelector("[data-repeated]");
        if (!info) return;
        var repeated = parseInt(info.getAttribute("data-repeated"), 10);
        var lhs = info.getAttribute("data-lhs") || (repeated + " images x repeats");
        var epochs = numberIn("lora_train_max_train_epochs");
        var batch = numberIn("lora_train_train_batch_size");
        var accum = numberIn("lora_train_gradient_accumulation_steps") || 1;
        if (!(repeated > 0) || !epochs || !batch) return;
        var perEpoch = Math.max(1, Math.ceil(Math.ceil(repeated / batch) / accum));
        var live = line.querySelector(".lora-train-live-steps");
        if (live) {
            live.textContent = lhs + " per epoch / batch " + batch + (accum > 1 ? " / accumulation " + accum : "") +
                " = " + perEpoch + " steps per epoch x " + epochs + (epochs === 1 ? " epoch" : " epochs") + " = " +
                perEpoch * epochs + " steps";
        }
    }
    document.addEventListener("input", function (e) {
        var box = e.target.closest && e.target.closest("#lora_train_max_train_epochs, #lora_train_train_batch_size, #lora_train_gradient_accumulation_steps");
        if (box) updateSteps();
    });

    function clickAll(ids) {
        ids.forEach(function (id) {
            var button = el(id);
            if (button) button.click();
        });
    }

    // Status, loss plot and queue: refreshed every 2 s while the Train sub-tab is on screen. When a run
    // finishes, the webui's Lora cards are refreshed too (their hidden refresh buttons), so new epochs show up.
    var lastStatus = "";
    var lastMerge = "";
    setInterval(function () {
        var status = el("lora_train_status");
        var poll = el("lora_train_poll");
        if (visible(status) && poll && !document.hidden) poll.click();
        var text = status ? status.innerText : "";
        if (text !== lastStatus && /: (done|interrupted)/.test(text)) {
            clickAll(["txt2img_lora_extra_refresh_internal", "img2img_lora_extra_refresh_internal"]);
        }
        lastStatus = text;
        // a merged checkpoint: the webui's checkpoint list at the top of the page (and its cards) learn of it
        var merged = el("lora_train_merge_result");
        var mergedText = merged ? merged.innerText : "";
        if (mergedText !== lastMerge && /^saved /.test(mergedText)) {
            clickAll(["refresh_sd_model_checkpoint", "txt2img_checkpoints_extra_refresh_internal",
                      "img2img_checkpoints_extra_refresh_internal"]);
        }
        lastMerge = mergedText;
    }, 2000);

    // Caption editor keys: Ctrl+S saves, Alt+Left / Alt+Right open the previous / next image.
    document.addEventListener("keydown", function (e) {
        var editor = el("lora_train_caption_editor");
        if (!visible(editor)) return;
        if ((e.ctrlKey || e.metaKey) && e.key === "s") {
            var save = el("lora_train_caption_save");
            if (save) {
                e.preventDefault();
                save.click();
            }
            return;
        }
        if (e.altKey && (e.key === "ArrowRight" || e.key === "ArrowLeft")) {
            var thumbs = root().querySelectorAll("#lora_train_tag_gallery .thumbnail-item, #lora_train_tag_gallery .thumbnail-small");
            if (!thumbs.length) return;
            var idxBox = el("lora_train_caption_index");
            var current = idxBox ? parseInt((idxBox.querySelector("input") || {}).value, 10) : -1;
            var next = isFinite(current) ? current + (e.key === "ArrowRight" ? 1 : -1) : 0;
            next = Math.max(0, Math.min(thumbs.length - 1, next));
            e.preventDefault();
            thumbs[next].click();
        }
    });
})();
