"""Protection mechanisms: display masks, sealed images and their associated data, opening them again, and
the bridge to the compiled hot path (`guard_native`).

Owns: `masking` (mask kinds and the display forms), `aad` (the associated data that binds a sealed image to
its place), `reveal` (`open_image`, the only way back to plaintext), `fastpath` (whether and how the
compiled path is used). It offers mechanisms; which column gets which is decided in `guard.classify`.
May import: `guard.errors`, `guard.config`, `guard.keys`. Layer 2 of docs/architecture.md.
"""
