"""Urza: the artifact library seeds' kernels come from, and the device-side kernel cache
(docs/design.md §6).

An artifact is a payload (a ``torch.export`` program, ``.pt2``) plus a JSON manifest: id,
blueprint, format, SHA-256 and size of the payload, input spec, publisher key id and Ed25519
signature. A ``.pt2`` can hold pickles, so no byte of a payload is deserialised before its hash
and the manifest signature verify; a mismatch raises ``ArtifactIntegrityError`` and loads
nothing. Publishers sign with a private key; readers hold only public keys.

- ``keys`` -- ``PublisherKey`` (a publisher's Ed25519 private key, from a 0600 file) and
  ``TrustedPublishers`` (the public keys a trainer verifies with), and the manifest purpose tag.
- ``artifact`` -- the manifest, its signing and verification, id validation, store opening.
- ``publish`` -- the write side: export a module, sign, claim the id with the manifest and then
  write the payload (a reader finds the artifact missing until the payload lands; a local
  store through ``kasmina.utils.atomic``), and re-sign a retired HMAC manifest or one a
  retiring publisher key signed. ``kasmina urza publish`` and ``kasmina urza resign`` use it.
- ``client`` -- ``UrzaLibraryClient``: reads any fsspec URL (a local directory by default),
  verifies what it reads, and coalesces concurrent fetches of one artifact; ``store_url`` -- its
  store's URL checked (no caching or archive layer, an authority that parses) and the store
  opened (an HTTP session's timeout and redirect guard, a signed URL's query).
- ``resilience`` -- ``ReadGuard`` and ``CircuitBreaker``: how the client's reads are run, with
  timeouts on bounded I/O threads, retries with backoff, deadlines and a circuit breaker.
- ``redaction`` -- a store's URL credentials and secrets replaced by ``***`` in every message,
  log line and ``repr`` (``redact_urls``, ``store_secrets``, ``describe_error``).
- ``redirects`` -- an HTTP store's redirect to another origin refused while the request
  carries headers of the user's that aiohttp would forward there.
- ``aliasing`` -- parameters and buffers of one module that share memory, which a seed's copy
  of a kernel cannot keep shared: refused at publish, and at GERMINATE for an older artifact.
- ``kernel`` -- ``GPUKernel``: a verified, deserialised program on a device, with its manifest.
- ``fx_sources`` -- what torch keeps of each graph module it builds (torch.fx's generated
  sources, ``ShapeEnv``'s memos) dropped again, so a run that reloads kernels does not grow.
- ``refusals`` -- a program's own input checks, raising ``KernelInputRefused`` where they
  refuse a call (a seed sits it out), and torch's put back for ``kasmina.merge``.
- ``cache`` -- ``GPUKernelCache``: an LRU bounded in bytes, O(1) get/put, thread-safe, with
  pinning: a kernel attached to a live seed is never evicted.
- ``loader`` -- ``KernelLoader``: the path from an artifact id to a cached original and the
  trainable copy a seed gets (the cached original stays pristine).
- ``blueprints`` -- the seed architectures the demo and the CLI publish.

Imports ``kasmina.utils`` (atomic writes, locks, signed JSON; the HMAC keyring only to check
old manifests before re-signing them) and the root vocabulary; never seeds, isolation, control
or the manager. Each name is imported from its module: this package re-exports nothing, so
``keys`` (a publisher's key pair, ``kasmina keygen --publisher``) loads without torch.
"""
