"""The site's app guard: the SuperNode's ClientApps run only from app bundles the consortium signed.

The SuperNode runs with `--isolation process`: it starts no ClientApp itself, it hands each task
to whoever holds its SuperExec secret (`NodeLayout.superexec_secret`, 0600). That is the guard
(`python -m node.app_guard.superexec`), Flower's own SuperExec loop with its executor replaced:
a ClientApp task runs in `python -m node.app_guard.verified_clientapp`, Flower's `run_clientapp`
with one hook, which checks the app-publisher signature (`federation.security.app_signing`)
before the bundle is unpacked. A refused bundle is never unpacked or imported; the ServerApp
gets an error reply; the guard appends `clientapp.refused` (or `clientapp.approved`, before the
app runs) to the site's audit trail. `launch` is how the agent starts it.
"""
