"""imagine-bot's Discord side (discord.py). Imports engine.jobs (and the queue / worker factories
in the launcher), never torch."""
