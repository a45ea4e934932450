"""The class of a patched transformers model: a same-named subclass of its own class whose

- ``save_pretrained`` (which ``Trainer`` checkpoints and ``save_model()`` call) writes the adapters
  instead of the base weights (:func:`red_kernels.adapters.save_pretrained`), with a
  ``_keys_to_ignore_on_save`` listing the frozen keys (:func:`frozen_keys`), which transformers'
  Trainer compares with what a resumed checkpoint lacks;
- ``generate`` fixes the prompt's length for the whole generation when PARA pools the prompt's last
  token (:func:`~red_kernels.patch.context.generate_with_prompt`).

``unpatch_model`` / ``merge_model`` give the model its own class back.
"""

from __future__ import annotations

import types

from torch import nn

from red_kernels.patch import context


def frozen_keys(model: nn.Module) -> frozenset[str]:
    """The state-dict keys that ``save_pretrained`` of a patched model leaves out: the frozen base and
    the inactive adapters, computed when read (so adding an adapter costs nothing here).

    transformers' Trainer, resuming from a checkpoint, compares the keys the checkpoint lacks with
    the model's ``_keys_to_ignore_on_save`` and warns only when they differ."""
    from red_kernels.adapters import checkpoint_keys

    saved = checkpoint_keys(model)
    return frozenset(k for k in model.state_dict(keep_vars=True) if k not in saved)


def _save_pretrained(self, *args, **kwargs) -> None:
    from red_kernels.adapters import save_pretrained

    save_pretrained(self, *args, **kwargs)


# A property (a data descriptor), not a plain method: it wins over an instance attribute of the same
# name, such as the refusing ``save_pretrained`` that merge_model leaves on a merged model whose new
# biases its config cannot describe. Re-patching such a model must checkpoint its adapters; once
# unpatched, the class is the model's own again and the instance's refusal is back.
_SAVE_PRETRAINED = property(lambda self: types.MethodType(_save_pretrained, self))


def _set_ignored(self, value) -> None:  # transformers' post_init assigns it
    self.__dict__["_keys_to_ignore_on_save"] = value


def _generate(self, *args, **kwargs):
    from red_kernels.patch.core import patch_state

    state = patch_state(self)
    # getattr, not vars(type(self)): a wrapper (FSDP2's fully_shard) may subclass the class again
    generate = getattr(type(self), ROOT_BASE).generate
    if state is not None and state.prompt_generate:
        return context.generate_with_prompt(state, self, generate, *args, **kwargs)
    return generate(self, *args, **kwargs)


_ROOT_CLASSES: dict[type, type] = {}
ROOT_BASE = "_red_kernels_root_base"


def attach_root_class(model: nn.Module) -> None:
    """A patched transformers model's class becomes a subclass (same name) whose

    - ``save_pretrained`` (which Trainer checkpoints and ``save_model()`` call) writes the adapters
      instead of the base weights (:func:`red_kernels.adapters.save_pretrained`), with a
      ``_keys_to_ignore_on_save`` listing the frozen keys (:func:`frozen_keys`);
    - ``generate`` fixes the prompt's length for the whole generation when PARA pools it
      (:func:`~red_kernels.patch.context.generate_with_prompt`).

    A class rather than methods stored on the instance: those would hold the model and make a
    reference cycle, keeping a deleted model's memory until the garbage collector's next full pass."""
    cls = type(model)
    if getattr(cls, ROOT_BASE, None) is not None:  # already (also under a wrapper's subclass)
        return
    if cls not in _ROOT_CLASSES:
        body = {ROOT_BASE: cls, "__module__": cls.__module__, "__qualname__": f"RED_KERNELS[{cls.__qualname__}]"}
        if callable(getattr(cls, "save_pretrained", None)):
            body["save_pretrained"] = _SAVE_PRETRAINED
            body["_keys_to_ignore_on_save"] = property(frozen_keys, _set_ignored)
        if callable(getattr(cls, "generate", None)):
            body["generate"] = _generate
        if len(body) == 3:
            return
        _ROOT_CLASSES[cls] = type(cls.__name__, (cls,), body)
    model.__class__ = _ROOT_CLASSES[cls]


def detach_root_class(model: nn.Module) -> None:
    base = vars(type(model)).get(ROOT_BASE)
    if base is not None:
        model.__class__ = base


__all__ = ["attach_root_class", "detach_root_class", "frozen_keys"]
