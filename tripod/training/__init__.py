"""The training leg: supervised fine-tuning whose output the server loads."""
