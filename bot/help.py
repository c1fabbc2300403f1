"""/help: the prompt syntax (permutations too), the buttons, the presets and the limits, from the live config."""

from __future__ import annotations

from bot.config import PRESET_NAMES, Config
from engine.prompts import MAX_PROMPT_PARTS

LIMIT = 2000


def help_text(config: Config, per_user: int) -> str:
    im = config.imagine
    presets = " · ".join(
        f"`{name}` {p.size}px, {p.iterations} steps, {p.cutn} cut-outs"
        for name in PRESET_NAMES for p in [getattr(config.presets, name)]
    )
    text = "\n".join([
        "**imagine-bot**: CLIP steers DALL-E's decoder toward your words; the reply shows the picture as it forms.",
        "",
        "**Commands**",
        "`/imagine prompt [quality] [iterations] [seed] [size] [image] [image_weight] [init_image]`",
        "`/remix job prompt [iterations]`: start from another job's final picture, toward a new prompt",
        "`/history` this channel's prompts · `/queue show` this server's jobs in the line · "
        "`/queue cancel job` cancel one of yours",
        "",
        "**Prompts**: `a house | by Escher:0.5 | blurry:-1`: up to "
        f"{MAX_PROMPT_PARTS} parts split by `|`, each with an optional `:weight` (-100 to 100, default 1; "
        "negative pushes away), at least one positive. "
        f"`image`: a picture to aim at too (`image_weight`, default 1); `init_image`: start from a picture.",
        "",
        "**Permutations**: `a {red, blue} house by {Escher, Magritte}` makes one job per combination "
        f"(4 here: options split by commas, no nesting), at most {im.max_permutations} per prompt; each "
        "counts as a waiting job, and one contact sheet shows them all once they have ended.",
        "",
        "**Buttons**: 🎲 Reroll (same prompt, new seed) · ➕ Continue (more steps from the end) · "
        "🎨 Remix (new prompt from this picture) · Cancel (the author or an admin of the server).",
        "",
        f"**Quality presets**: {presets}. Options you give override the preset.",
        "",
        f"**Limits**: prompts up to {im.max_prompt_chars} characters (CLIP reads about 77 tokens), "
        f"1-{im.max_iterations} iterations, images up to {im.max_image_bytes / 2**20:.0f} MiB, "
        f"{per_user} waiting job{'s' if per_user != 1 else ''} per person.",
    ])
    return text[:LIMIT]
