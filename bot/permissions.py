"""Who may use the admin commands: Manage Server, or a role named in config `admin_roles`."""

from __future__ import annotations

import discord

from bot.config import Config


def is_admin(interaction: discord.Interaction, config: Config) -> bool:
    if interaction.guild_id is None:
        return False
    # The member's permissions as Discord resolved them for this interaction (no cache needed).
    if interaction.permissions.manage_guild or interaction.permissions.administrator:
        return True
    user = interaction.user
    wanted = {name.casefold() for name in config.discord.admin_roles}
    if isinstance(user, discord.Member) and wanted:
        return any(role.name.casefold() in wanted for role in user.roles)
    return False


async def require_admin(interaction: discord.Interaction, config: Config) -> bool:
    """True for an admin; anyone else gets an ephemeral refusal saying who may, and False."""
    if is_admin(interaction, config):
        return True
    from bot.imagine import ephemeral   # noqa: PLC0415 - bot.imagine imports this module

    roles = ", ".join(f"`{r}`" for r in config.discord.admin_roles)
    await ephemeral(interaction, "Only admins can do that: it needs the Manage Server permission"
                              + (f" or one of the roles {roles}." if roles else "."))
    return False
