"""Keeping what you grew: save, load and merge a model with Kasmina slots (docs/design.md §6a).

A grown model is a host plus slots whose seeds run kernels that came, verified, from Urza and
were then trained. ``state_dict`` alone cannot carry it: the seeds' weights are there, but
their programs are not, and a program is code (a ``.pt2`` may hold pickles) that must never be
loaded without its publisher's signature. So:

- :func:`~kasmina.persist.saving.save` writes one self-contained file: the host's and every
  seed's weights, each seed's stage, alpha and bookkeeping, the slot layout, and each live
  kernel's program as the artifact it was loaded from (payload plus signed manifest);
- :func:`~kasmina.persist.loading.load` verifies the file and every manifest (against the
  caller's ``TrustedPublishers``) before deserialising anything, checks the layout against a
  freshly built host, builds the kernels and slots aside, and only then changes the model;
- :func:`~kasmina.persist.merging.merge` bakes ACTIVE seeds into plain ``torch.fx`` modules and
  drops every Kasmina object, so the result runs and exports without Kasmina.

This package composes ``seeds`` and ``urza`` the way ``manager`` does, and sits beside it in
the import order: neither imports the other.
"""

from __future__ import annotations

from kasmina.persist.format import FORMAT_VERSION, SavedModelError
from kasmina.persist.loading import load
from kasmina.persist.merging import merge
from kasmina.persist.saving import save

__all__ = ["FORMAT_VERSION", "SavedModelError", "load", "merge", "save"]
