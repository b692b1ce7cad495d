"""The pickler that ships code: cloudpickle, noting the user modules a pickle refers to.

Kept apart from :mod:`clusterexec.code.shipping` because importing cloudpickle is costly: a worker
imports this module only when it pickles something richer than a scalar, and a node never.
"""

from __future__ import annotations

import io
import pickle
import sys
import types
from typing import Any

import cloudpickle

from clusterexec.code.shipping import ModuleCatalog, ModuleSource, is_user_module, main_toplevel_qualname, resolve_main
from clusterexec.code.versions import third_party


class ShippingPickler(cloudpickle.Pickler):
    """A cloudpickle Pickler that notes the user modules a pickle needs.

    After ``dump``: ``modules`` holds the user modules referred to, ``uses_main`` whether the
    main script is needed on the worker, ``by_value`` whether any code was pickled as bytecode
    (which only a worker on the same Python minor version can load).
    """

    def __init__(self, file: io.BytesIO, catalog: ModuleCatalog, **kwargs: Any) -> None:
        super().__init__(file, protocol=5, **kwargs)
        self.catalog = catalog
        self.modules: dict[str, types.ModuleType] = {}
        self.uses_main = False
        self.main_by_value = False
        self.by_value = False
        self._modules_seen: set[object] = set()

    def _note_package(self, obj: Any) -> None:
        # The third-party packages a pickle refers to by name: ex.check() compares their
        # versions with the nodes'.
        module = getattr(obj, "__module__", None)
        if module not in self._modules_seen:
            self._modules_seen.add(module)
            top = third_party(module)
            if top is not None:
                self.catalog.note_package(top)

    def _note(self, name: object) -> None:
        if not isinstance(name, str) or name in self.modules:
            return
        module = sys.modules.get(name)
        if module is not None and is_user_module(module):
            self.modules[name] = module

    def reducer_override(self, obj: Any) -> Any:
        """Send main-script objects by name; note user modules; flag code sent as bytecode."""
        if isinstance(obj, (types.FunctionType, type)):
            self._note_package(obj)
            if self.catalog.auto:
                qualname = main_toplevel_qualname(obj)
                if qualname is not None and self.catalog.by_name_in_main(qualname):
                    self.uses_main = True
                    return resolve_main, (qualname,)
                if getattr(obj, "__module__", None) == "__main__":
                    self.main_by_value = True  # its source goes along, for the traceback's lines
                self._note(getattr(obj, "__module__", None))
            result = super().reducer_override(obj)
            if result is not NotImplemented and isinstance(obj, types.FunctionType):
                # Only functions carry bytecode (a class by value is rebuilt from its functions,
                # which come through here too); builtin types go by name.
                self.by_value = True
            return result
        if type(obj) is types.BuiltinFunctionType:
            self._note_package(obj)
        elif isinstance(obj, types.ModuleType):
            top = third_party(obj.__name__)
            if top is not None:
                self.catalog.note_package(top)
            if self.catalog.auto:
                self._note(obj.__name__)
        if type(obj) is types.CodeType and _reduce_code is not None:
            # cloudpickle writes "<dynamic-code>" as the file name of code sent by value; keep
            # the real one, so remote tracebacks name the file and line (and show the line).
            constructor, args = _reduce_code(obj)
            return _code_in_file, (constructor, args, obj.co_filename)
        return super().reducer_override(obj)


# A bytes object at least this large that a callable captures travels out of band.
BIG_BYTES = 64 * 1024
_BIG_BYTES_ID = "clusterexec.bytes"


class CapturePickler(ShippingPickler):
    """The pickler of callables: as :class:`ShippingPickler`, and large ``bytes`` go out of band.

    The C pickler writes ``bytes`` straight into the stream without asking
    ``reducer_override``, so a captured 1 GiB bytes object would be copied into the pickle (and
    the frame carrying it). ``persistent_id`` sees every object first: a large one is named by a
    persistent id holding a ``PickleBuffer`` of it, which protocol 5 sends out of band.
    :class:`CaptureUnpickler` rebuilds the bytes. Asked for every object, so used only for the
    callable, pickled once per executor, not for arguments and results."""

    def persistent_id(self, obj: Any) -> Any:
        """A persistent id for a large bytes object, None (pickle as usual) for anything else."""
        if type(obj) is bytes and len(obj) >= BIG_BYTES:
            return (_BIG_BYTES_ID, pickle.PickleBuffer(obj))
        return None


class CaptureUnpickler(pickle.Unpickler):
    """Loads what :class:`CapturePickler` wrote: large bytes come back from their buffers."""

    def persistent_load(self, pid: Any) -> Any:
        """The bytes a persistent id names; raises UnpicklingError for any other id."""
        if isinstance(pid, tuple) and len(pid) == 2 and pid[0] == _BIG_BYTES_ID:
            return bytes(pid[1])
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")


_reduce_code = getattr(cloudpickle.cloudpickle, "_code_reduce", None)


def _code_in_file(constructor: Any, args: tuple[Any, ...], filename: str) -> types.CodeType:
    """Rebuild a code object pickled by value, with the file name it was compiled from."""
    code: types.CodeType = constructor(*args)
    return code.replace(co_filename=filename)


def needed_sources(catalog: ModuleCatalog, pickler: ShippingPickler) -> tuple[ModuleSource, ...]:
    """The module sources a pickle made by ``pickler`` needs on the worker, in import order."""
    out: list[ModuleSource] = []
    if pickler.uses_main or pickler.main_by_value:
        main = catalog.main_source()
        if main is not None:
            if pickler.uses_main:
                out.extend(s for s in catalog.main_dependencies() if s not in out)
            out.append(main)
    for module in pickler.modules.values():
        for source in catalog.sources_of(module):
            if source not in out:
                out.append(source)
    return tuple(out)
