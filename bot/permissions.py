"""Who may use the admin commands: Manage Server, or a role in config `admin_roles` (by id or name)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import discord

from bot import render
from bot.config import Config
from engine.jobs import JobRecord

log = logging.getLogger(__name__)


def is_admin(interaction: discord.Interaction, config: Config) -> bool:
    if interaction.guild_id is None:
        return False
    # The member's permissions as Discord resolved them for this interaction (no cache needed).
    if interaction.permissions.manage_guild or interaction.permissions.administrator:
        return True
    user = interaction.user
    ids, names = admin_role_entries(config)
    if isinstance(user, discord.Member) and (ids or names):
        if ids & member_role_ids(user):
            return True
        return any(role.name.casefold() in names for role in user.roles)   # names need the cached roles
    return False


def admin_role_entries(config: Config) -> tuple[set[int], set[str]]:
    """`[discord] admin_roles` as (role ids, casefolded role names). An entry shaped like a
    snowflake is a role id; anything else a role name ("2024" too). A name is matched by whatever
    role bears it, which anyone with Manage Roles can create: an id names the one role meant."""
    entries = [entry.strip() for entry in config.discord.admin_roles if entry.strip()]
    return ({int(entry) for entry in entries if is_role_id(entry)},
            {entry.casefold() for entry in entries if not is_role_id(entry)})


def member_role_ids(member: discord.Member) -> set[int]:
    """The ids of `member`'s roles, as the interaction's member payload gives them, cached guild or not.

    `Member.roles` (and `Member.get_role`) resolve them through the cached guild: while a server
    is not cached (just after connecting, before its GUILD_CREATE; or unavailable) discord.py gives
    a placeholder guild with no roles, and they are empty. discord.py 2.x has no public attribute
    for the ids themselves; it keeps them in the private `Member._roles` (a SnowflakeList), read
    here along with the cached roles. Should a later discord.py drop `_roles`, only the cached
    roles count again (tests/test_bot_admin.py's test of a server not cached yet then fails)."""
    return {role.id for role in member.roles} | set(getattr(member, "_roles", None) or ())


def roles_not_loaded(interaction: discord.Interaction, config: Config) -> bool:
    """Whether an admin role configured by name might be held by the caller but cannot be told:
    role names are configured and the caller holds roles that the cache does not know (the server
    is not cached yet, `member_role_ids`), so a name cannot be matched to them."""
    user = interaction.user
    if not isinstance(user, discord.Member):
        return False
    if not admin_role_entries(config)[1]:   # no role names: ids need no cache
        return False
    guild = user.guild
    return any(guild.get_role(role_id) is None for role_id in member_role_ids(user))


def is_role_id(entry: str) -> bool:
    """Whether an `admin_roles` entry is a role id: 17 to 20 digits (a Discord snowflake). Shorter
    digits ("2024") are a role's name."""
    entry = entry.strip()
    return entry.isascii() and entry.isdigit() and 17 <= len(entry) <= 20


ADMIN_ROLES_CHARS = 300   # the roles' part of a refusal; a longer list names the first ones, then "and N more"
ROLE_NAME_CHARS = 40      # a role name in it (Discord allows 100), cut by render.quote


def admin_roles_text(config: Config, limit: int = ADMIN_ROLES_CHARS) -> str:
    """The configured admin roles for a message: an id as a role mention (shown as the role's name;
    the client's allowed mentions ping no one), a name quoted (`render.quote`, cut to
    ROLE_NAME_CHARS). At most `limit` characters: a long list (any number of roles may be
    configured) names the first ones and "and N more", so a refusal stays far below Discord's
    2000-character content limit (over it, the refusal itself would fail). Always at least one
    role when any is configured."""
    shown = [f"<@&{r.strip()}>" if is_role_id(r) else render.quote(r, ROLE_NAME_CHARS)
             for r in config.discord.admin_roles]
    text = ", ".join(shown)
    if len(text) <= limit:
        return text
    count, length = 1, len(shown[0])   # the first `count` roles, joined: `length` characters
    while count < len(shown) and (length + 2 + len(shown[count])
                                  + len(f" and {len(shown) - count - 1} more") <= limit):
        length += 2 + len(shown[count])
        count += 1
    return ", ".join(shown[:count]) + f" and {len(shown) - count} more"


def admin_command_permissions(config: Config) -> discord.Permissions | None:
    """`/queue-admin`'s default_member_permissions: Manage Server when no admin role is configured,
    so Discord hides the command from members by default (a server's admins can change who sees
    it: Server Settings → Integrations). None (everyone sees it) when roles are configured: Discord
    knows nothing of `admin_roles`, and would hide it from a role's members who lack Manage Server.
    Either way `require_admin` decides who may use it; this only decides who is shown it."""
    if any(entry.strip() for entry in config.discord.admin_roles):
        return None
    return discord.Permissions(manage_guild=True)


async def require_admin(interaction: discord.Interaction, config: Config) -> bool:
    """True for an admin; anyone else gets an ephemeral refusal saying who may, and False."""
    if is_admin(interaction, config):
        return True
    from bot.imagine import ephemeral   # noqa: PLC0415 - bot.imagine imports this module

    roles = admin_roles_text(config)
    text = ("Only admins can do that: it needs the Manage Server permission"
            + (f" or one of the roles {roles}." if roles else "."))
    if roles_not_loaded(interaction, config):   # a role given by name cannot be told from the rest yet
        text += (" I have not loaded this server's roles yet (I just connected, or Discord has not sent "
                 "them), so I cannot tell whether one of yours is an admin role given by name: try again "
                 "in a moment.")
    await ephemeral(interaction, text)
    return False


class ThreadLookups:
    """Whom one command found in which private threads, asked of Discord at most `budget` times.

    The bot learns of other users joining a private thread only with the privileged members
    intent, which it does not ask for; Get Thread Member answers without it. One command asks
    once per thread, and a listing (`/queue show`) asks for at most `budget` threads: the rest are
    hidden, as anything that cannot be checked is."""

    def __init__(self, budget: int = 10) -> None:
        self.budget = budget
        self.answers: dict[int, bool] = {}   # thread id -> the caller is a member

    async def is_member(self, thread: discord.Thread, user_id: int) -> bool:
        if thread.id in self.answers:
            return self.answers[thread.id]
        if self.budget <= 0:
            return False
        self.budget -= 1
        try:
            await thread.fetch_member(user_id)
            found = True
        except discord.NotFound:   # 404 Unknown Member: not in the thread
            found = False
        except discord.HTTPException as error:   # refused or failed: hidden, as what cannot be checked
            log.info("thread member lookup in %s failed (%s %s): its jobs stay hidden", thread.id,
                     error.status, error.code)
            found = False
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as error:   # no answer at all: the same
            log.info("thread member lookup in %s failed (%s): its jobs stay hidden", thread.id,
                     type(error).__name__)
            found = False
        self.answers[thread.id] = found
        return found


async def can_view_channel(interaction: discord.Interaction, channel_id: int | None,
                           lookups: ThreadLookups | None = None) -> bool:
    """Whether the member behind `interaction` may see channel `channel_id` of the interaction's
    server: a job's prompt, author and pictures belong to the channel it was made in, and any id
    typed into `/remix` or listed by `/queue show` would otherwise show a private channel's job to
    anyone in the server. Unknown (no guild, a channel missing from the cache, a user who is no
    member): False, so what cannot be checked is hidden. That includes a server not cached yet (just
    after connecting, before its GUILD_CREATE; or unavailable): discord.py's placeholder guild has no
    channels, roles or overwrites to compute permissions from, so only the interaction's own
    channel is seen until it arrives. `lookups`: the command's Discord lookups of private-thread
    members (a fresh one when None)."""
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
        if any(thread_member.id == member.id for thread_member in channel.members):
            return True
        return await (lookups or ThreadLookups()).is_member(channel, member.id)
    return True


async def can_see_job(interaction: discord.Interaction, record: JobRecord,
                      lookups: ThreadLookups | None = None) -> bool:
    """Whether the caller may see `record` (its prompt, author, pictures, id): a job of this server
    whose channel, and the channel its reply is in, the caller can view (`can_view_channel`)."""
    spec = record.spec
    if spec.guild_id is None or spec.guild_id != interaction.guild_id:
        return False
    channels = {spec.channel_id}
    reply_channel = (spec.reply or {}).get("channel_id")
    if reply_channel:
        channels.add(int(reply_channel))
    lookups = lookups or ThreadLookups()
    for channel_id in channels:
        if not await can_view_channel(interaction, channel_id, lookups):
            return False
    return True


async def may_know_job(interaction: discord.Interaction, record: JobRecord, *, admin: bool) -> bool:
    """Whether the caller may learn that `record` exists (to cancel it): their own job; else one of
    this server that they, as its admin (`admin`: `is_admin`), may act on, or whose channel they can
    see (`can_see_job`). Any other reads as an unknown id (a forged button's included)."""
    if record.spec.user_id == interaction.user.id:
        return True
    if interaction.guild_id is None or record.spec.guild_id != interaction.guild_id:
        return False
    return admin or await can_see_job(interaction, record)


# What posting a result needs once the command's interaction token has expired (15 minutes): from
# then on bot/progress.py edits the job's reply through the channel and, when that message is
# gone, sends a new message with the final image and video (so does a permutation set's contact
# sheet). Slash commands themselves need none of these, so they are checked when a job is asked
# for. Discord's names for them, as its UI shows them.
THREAD_TYPES = (discord.ChannelType.public_thread, discord.ChannelType.private_thread,
                discord.ChannelType.news_thread)


def missing_for_results(interaction: discord.Interaction) -> list[str]:
    """The permissions the bot lacks in the interaction's channel (`app_permissions`, which Discord
    resolves with the channel's overwrites) to post a result there after the token's 15 minutes:
    View Channel, Send Messages (in a thread: Send Messages in Threads) and Attach Files. [] when it
    has them all, or outside a server (nothing to check: the job commands are for servers)."""
    if interaction.guild_id is None:
        return []
    perms = interaction.app_permissions
    if perms.administrator:
        return []
    in_thread = getattr(interaction.channel, "type", None) in THREAD_TYPES
    needed = [("view_channel", "View Channel"),
              ("send_messages_in_threads", "Send Messages in Threads") if in_thread
              else ("send_messages", "Send Messages"),
              ("attach_files", "Attach Files")]
    return [name for attr, name in needed if not getattr(perms, attr)]


def results_refusal(interaction: discord.Interaction) -> str | None:
    """The private refusal of a job the bot could not deliver in this channel (`missing_for_results`),
    naming what it lacks; None when it can. Refused whatever the job's length: how long it waits in
    line is not known when it is asked for."""
    missing = missing_for_results(interaction)
    if not missing:
        return None
    names = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " and " + missing[-1]
    return (f"I can't post results in this channel: I'm missing {names}. Ask a server admin, or use "
            "another channel.")


# The keys of `authorizing_integration_owners`: a guild install ("0") and a user install ("1").
USER_INSTALL = 1

NOT_INSTALLED = ("I'm not a member of this server (you added me to your account, not to the server), so I "
                 "can't post results or keep settings here. Ask a server admin to add me to the server, or "
                 "use me in a server I'm in.")


def not_installed_here(interaction: discord.Interaction) -> bool:
    """An interaction from a server that has not installed the bot: it reached the bot through a
    user install (`authorizing_integration_owners` names the user's install, "1", and not this
    server's, "0"), so the bot is not in that server, can read nothing of it and could never post
    a result there. Only that: a component on a message the bot posted with its own token (a
    result after the token's 15 minutes, a new message after a deleted reply or in an archived
    thread, a contact sheet) may come with no owners at all, and is the bot's own server's.

    The user's install is looked for as a key, not as `is_user_integration()` (whose owner must be
    the user who clicks): a button on a message made through someone's user install names that
    someone, whoever clicks it. discord.py keeps the owners in `_integration_owners` alone."""
    owners = getattr(interaction, "_integration_owners", None) or {}
    return (interaction.guild_id is not None and USER_INSTALL in owners
            and not interaction.is_guild_integration())
