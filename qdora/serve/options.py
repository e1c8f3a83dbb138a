"""What the serving commands' parsers and their code share, importing nothing heavy."""

API_KEY_ENV = "QDORA_API_KEY"
"""`qdora serve --api-key`'s environment variable."""
BASES = ("auto", "nf4", "full")
"""`--base`: `nf4` quantizes the base (qdora/qlora adapters were trained over one), `full` keeps it as
stored (lora/dora adapters), `auto` picks `full` only when every adapter was trained over a full base."""
HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset), /exit"
"""`qdora chat`'s commands."""
