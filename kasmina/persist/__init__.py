"""Keeping what you grew: save, load and merge a model with Kasmina slots (docs/design.md §6a).

A grown model is a host plus slots whose seeds run kernels that came, verified, from Urza and
were then trained. ``state_dict`` alone cannot carry it: the seeds' weights are there, but
their programs are not, and a program is code (a ``.pt2`` may hold pickles) that must never be
loaded without its publisher's signature. So:

- ``saving`` -- ``kasmina.save`` writes one self-contained file: the host's and every seed's
  weights, each seed's stage, alpha and bookkeeping, the slot layout, and each live kernel's
  program as the artifact it was loaded from (payload plus signed manifest).
- ``loading`` -- ``kasmina.load`` verifies the file and every manifest (against the caller's
  ``TrustedPublishers``) before deserialising anything, checks the layout against a freshly
  built host, builds the kernels and slots aside, and only then changes the model.
- ``merging`` -- ``kasmina.merge`` bakes ACTIVE seeds into plain ``torch.fx`` modules and drops
  every Kasmina object, so the result runs and exports without Kasmina.
- ``format`` -- the file itself: magic, a JSON header with the body's size and SHA-256, a body
  read with ``torch.load(weights_only=True)``; ``SavedModelError`` for any refusal.

This package composes ``seeds`` and ``urza`` the way ``manager`` does, and sits beside it in
the import order: neither imports the other. Each name is imported from its module: this package
re-exports nothing (``save``, ``load`` and ``merge`` are ``kasmina.save``, ``kasmina.load`` and
``kasmina.merge``).
"""
