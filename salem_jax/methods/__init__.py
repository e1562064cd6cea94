"""Editing methods the pipeline can run, by name (config.methods): see `registry` for the
`Method` value and the README's "Adding a method".

Built in: salem, salem3, mend_fixed (`mend`), ft, ft_kl (`finetune`), causal (`mend`), rome
(`rome`), ke and enn (`meta`; classifiers), salem_edit (`salem_edit`: the editor on the layer of
highest editability), rrome, memit, emmet and alphaedit (`locate_edit`). A new method is one module
defining a `Method` plus one entry in `BUILTIN` (or a `register(method)` call from your own code,
e.g. a test)."""

from salem_jax.methods import finetune, locate_edit, mend, meta, rome, salem_edit
from salem_jax.methods.registry import KINDS, Context, Method, Prepared, get, names, register, unregister

BUILTIN = (mend.SALEM, mend.SALEM3, mend.MEND_FIXED, finetune.FT, finetune.FT_KL, mend.CAUSAL, rome.ROME, meta.KE, meta.ENN,
           salem_edit.SALEM_EDIT, locate_edit.RROME, locate_edit.MEMIT, locate_edit.EMMET, locate_edit.ALPHAEDIT)
for _method in BUILTIN:
    register(_method)
del _method

__all__ = ["BUILTIN", "KINDS", "Context", "Method", "Prepared", "get", "names", "register", "unregister"]
