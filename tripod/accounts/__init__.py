"""Who may call and how much: API keys, their per-key limits and usage, and the admin's login lockout."""
