"""Who may call and how much: API keys, their per-key limits and usage, and the admin's login lockout.

One package, so that everything that decides who may use the server, and every record of what they used, is found in
one place.
"""
