"""The class of a patched transformers model: a same-named subclass of its own class whose

- ``save_pretrained`` (which ``Trainer`` checkpoints and ``save_model()`` call) writes the adapters
  instead of the base weights (:func:`red_kernels.adapters.save_pretrained`), with a
  ``_keys_to_ignore_on_save`` listing the frozen keys (:class:`FrozenKeys`), which transformers'
  Trainer compares with what a resumed checkpoint lacks;
- ``generate`` fixes the prompt's length for the whole generation when PARA pools the prompt's last
  token (:func:`~red_kernels.patch.context.generate_with_prompt`).

``unpatch_model`` / ``merge_model`` give the model its own class back.
"""

from __future__ import annotations

from collections.abc import Set

from torch import nn

from red_kernels.patch import context


class FrozenKeys(Set):
    """The state-dict keys that ``save_pretrained`` of a patched model leaves out: the frozen base and
    the inactive adapters, computed when read (so adding an adapter costs nothing here).

    transformers' Trainer, resuming from a checkpoint, compares the keys the checkpoint lacks with
    the model's ``_keys_to_ignore_on_save`` and warns only when they differ."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def _keys(self) -> set[str]:
        from red_kernels.adapters import checkpoint_keys

        saved = checkpoint_keys(self.model)
        return {k for k in self.model.state_dict(keep_vars=True) if k not in saved}

    def __contains__(self, key: object) -> bool:
        return key in self._keys()

    def __iter__(self):
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


def _save_pretrained(self, *args, **kwargs) -> None:
    from red_kernels.adapters import save_pretrained

    save_pretrained(self, *args, **kwargs)


def _set_ignored(self, value) -> None:  # transformers' post_init assigns it
    self.__dict__["_keys_to_ignore_on_save"] = value


def _generate(self, *args, **kwargs):
    from red_kernels.patch.core import patch_state

    state = patch_state(self)
    generate = vars(type(self))[ROOT_BASE].generate
    if state is not None and state.prompt_generate:
        return context.generate_with_prompt(state, self, generate, *args, **kwargs)
    return generate(self, *args, **kwargs)


_ROOT_CLASSES: dict[type, type] = {}
ROOT_BASE = "_red_kernels_root_base"


def attach_root_class(model: nn.Module) -> None:
    """A patched transformers model's class becomes a subclass (same name) whose

    - ``save_pretrained`` (which Trainer checkpoints and ``save_model()`` call) writes the adapters
      instead of the base weights (:func:`red_kernels.adapters.save_pretrained`), with a
      ``_keys_to_ignore_on_save`` listing the frozen keys (:class:`FrozenKeys`);
    - ``generate`` fixes the prompt's length for the whole generation when PARA pools it
      (:func:`~red_kernels.patch.context.generate_with_prompt`).

    A class rather than methods stored on the instance: those would hold the model and make a
    reference cycle, keeping a deleted model's memory until the garbage collector's next full pass."""
    cls = type(model)
    if ROOT_BASE in vars(cls):
        return
    if cls not in _ROOT_CLASSES:
        body = {ROOT_BASE: cls, "__module__": cls.__module__, "__qualname__": f"RED_KERNELS[{cls.__qualname__}]"}
        if callable(getattr(cls, "save_pretrained", None)):
            body["save_pretrained"] = _save_pretrained
            body["_keys_to_ignore_on_save"] = property(FrozenKeys, _set_ignored)
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


__all__ = ["FrozenKeys", "attach_root_class", "detach_root_class"]
