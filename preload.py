"""Command-line options of the LoRA Train tab (the webui refuses unknown flags, so they must be added here)."""


def preload(parser):
    parser.add_argument(
        "--lora-train-dir", type=str, default=None,
        help="LoRA Train: folder holding the training projects (dataset, settings, logs, samples); "
             "default: <webui data dir>/lora-train",
    )
    parser.add_argument(
        "--lora-train-output-subdir", type=str, default="",
        help="LoRA Train: subfolder of the Lora folder that trained epochs go to, as <subdir>/<project>/; "
             "default: <Lora folder>/<project>",
    )
