"""Secret sharing and secure computation (CrypTen), and attested encrypted channels.

Import CrypTen only through :func:`fedprompt.secure.crypten_compat.import_crypten`.
"""
