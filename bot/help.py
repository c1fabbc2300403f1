"""/help: the prompt syntax (permutations too), the buttons, the presets and the limits, from the live config."""

from __future__ import annotations

from bot.config import PRESET_NAMES, Config
from bot.render import mib
from bot.permutations import template_chars
from engine.prompts import MAX_PROMPT_PARTS

LIMIT = 2000


def permutations_text(config: Config, per_user: int) -> str:
    """The permutation paragraph: the most a user can get from one prompt is the smaller of
    `max_permutations` and their cap of waiting jobs (every job of a set waits in line), and the
    example is one of that size or smaller, so it is never refused with these settings. Each form
    ends with LITERAL_BRACES: escaped braces work whether sets do or not."""
    most = min(config.imagine.max_permutations, per_user)
    if config.imagine.max_permutations < 2:
        return "**Permutations** (`a {red, blue} house`, one job per option) are turned off here." + LITERAL_BRACES
    if most < 2:
        return (f"**Permutations** (`a {{red, blue}} house` makes one job per option) need room for 2 waiting "
                f"jobs; the limit here is {per_user}." + LITERAL_BRACES)
    if most >= 4:
        example, count = "`a {red, blue} house by {Escher, Magritte}`", 4
    else:
        example, count = "`a {red, blue} house`", 2
    return (f"**Permutations**: {example} makes one job per combination ({count} here; options split by "
            f"commas, or by `|` as in `{{cat|dog}}` (then an option may hold commas), no nesting), at most "
            f"{most} per prompt; each counts as a waiting job, and one contact sheet shows them all once they "
            "have ended, with each job's id (for `/remix`) and link." + LITERAL_BRACES)


# bot.permutations: `\{` and `\}` are braces to keep (no set), in /imagine and /remix alike.
LITERAL_BRACES = " `\\{` and `\\}` are literal braces."


def help_text(config: Config, per_user: int) -> str:
    im = config.imagine
    presets = " · ".join(
        f"`{name}` {p.size}px, {p.iterations} iterations, {p.cutn} cut-outs"
        for name in PRESET_NAMES for p in [getattr(config.presets, name)]
    )
    text = "\n".join([
        "**imagine-bot**: CLIP steers DALL-E's decoder toward your words; the reply shows the picture as it forms.",
        "",
        "**Commands**",
        "`/imagine prompt [quality] [iterations] [seed] [size] [image] [image_weight] [init_image]`",
        "`/remix job prompt [iterations]`: start from another job's final picture, toward a new prompt",
        "`/history` this channel's prompts · `/queue show` this server's jobs in the line · "
        "`/queue cancel job` cancel one of yours · `/queue-admin` (admins) manage the line and refused words",
        "",
        "**Prompts**: `a house | by Escher:0.5 | blurry:-1`: up to "
        f"{MAX_PROMPT_PARTS} parts split by `|`, each with an optional `:weight` (-100 to 100, default 1; "
        "negative pushes away), at least one positive, or an `image` with a positive weight. "
        f"`image`: a picture to aim at too (`image_weight`, default 1); `init_image`: start from a picture.",
        "",
        permutations_text(config, per_user),
        "",
        "**Buttons**: 🎲 Reroll (same prompt, new seed) · ➕ Continue (more iterations from the end; the same "
        "each time, so a second one points to the first) · "
        "🎨 Remix (new prompt from this picture) · Cancel (the author or an admin of the server). "
        "Replies and `/history` name each job's source (↻ reroll of, → continues, ↳ remix of).",
        "",
        f"**Quality presets**: {presets}. Options you give override the preset.",
        "",
        f"**Limits**: prompts up to {im.max_prompt_chars} characters (CLIP reads about 77 tokens; "
        f"a `{{…}}` prompt up to {template_chars(im.max_prompt_chars)}, each combination up to {im.max_prompt_chars}), "
        f"1-{im.max_iterations} iterations, images up to {mib(im.max_image_bytes)}, "
        f"{per_user} waiting job{'s' if per_user != 1 else ''} per person.",
    ])
    return text[:LIMIT]
