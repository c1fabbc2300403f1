"""Who may use the admin commands: Manage Server, or a role named in config `admin_roles`."""

from __future__ import annotations

import discord

from bot.config import Config
from engine.jobs import JobRecord


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


def can_view_channel(interaction: discord.Interaction, channel_id: int | None) -> bool:
    """Whether the member behind `interaction` may see channel `channel_id` of the interaction's
    server: a job's prompt, author and pictures belong to the channel it was made in, and any id
    typed into `/remix` or listed by `/queue show` would otherwise show a private channel's job to
    anyone in the server. Unknown (no guild, a channel missing from the cache, a user who is no
    member): False, so what cannot be checked is hidden."""
    if channel_id is None or interaction.guild_id is None:
        return False
    if channel_id == interaction.channel_id:
        return True   # they are using it: Discord sends interactions only from channels one sees
    guild = interaction.guild
    if guild is None:
        return False
    channel = guild.get_channel_or_thread(channel_id)
    member = interaction.user if isinstance(interaction.user, discord.Member) else guild.get_member(interaction.user.id)
    if channel is None or member is None:
        return False
    try:
        # A thread's permissions are its parent's: discord.py raises ClientException when the
        # parent is not cached (what cannot be checked is hidden).
        perms = channel.permissions_for(member)
    except discord.ClientException:
        return False
    if not perms.view_channel:
        return False
    if isinstance(channel, discord.Thread) and channel.type == discord.ChannelType.private_thread:
        # A private thread is seen by the members of the thread (its owner among them) and by
        # those who may manage the parent's threads, not by everyone who sees the parent.
        if perms.manage_threads or (channel.owner_id is not None and channel.owner_id == member.id):
            return True
        return any(thread_member.id == member.id for thread_member in channel.members)
    return True


def can_see_job(interaction: discord.Interaction, record: JobRecord) -> bool:
    """Whether the caller may see `record` (its prompt, author, pictures, id): a job of this server
    whose channel, and the channel its reply is in, the caller can view (`can_view_channel`)."""
    spec = record.spec
    if spec.guild_id is None or spec.guild_id != interaction.guild_id:
        return False
    channels = {spec.channel_id}
    reply_channel = (spec.reply or {}).get("channel_id")
    if reply_channel:
        channels.add(int(reply_channel))
    return all(can_view_channel(interaction, channel_id) for channel_id in channels)
