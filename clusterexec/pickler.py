"""The pickler that ships code: cloudpickle, noting the user modules a pickle refers to.

Kept apart from :mod:`clusterexec.shipping` because importing cloudpickle is costly: a worker
imports this module only when it pickles something richer than a scalar, and a node never.
"""

from __future__ import annotations

import io
import sys
import types
from typing import Any

import cloudpickle

from clusterexec.shipping import ModuleCatalog, ModuleSource, is_user_module, main_toplevel_qualname, resolve_main


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
        self.by_value = False

    def _note(self, name: object) -> None:
        if not isinstance(name, str) or name in self.modules:
            return
        module = sys.modules.get(name)
        if module is not None and is_user_module(module):
            self.modules[name] = module

    def reducer_override(self, obj: Any) -> Any:
        """Send main-script objects by name; note user modules; flag code sent as bytecode."""
        if isinstance(obj, (types.FunctionType, type)):
            if self.catalog.auto:
                qualname = main_toplevel_qualname(obj)
                if qualname is not None and self.catalog.by_name_in_main(qualname):
                    self.uses_main = True
                    return resolve_main, (qualname,)
                self._note(getattr(obj, "__module__", None))
            result = super().reducer_override(obj)
            if result is not NotImplemented and isinstance(obj, types.FunctionType):
                # Only functions carry bytecode (a class by value is rebuilt from its functions,
                # which come through here too); builtin types go by name.
                self.by_value = True
            return result
        if isinstance(obj, types.ModuleType) and self.catalog.auto:
            self._note(obj.__name__)
        return super().reducer_override(obj)


def needed_sources(catalog: ModuleCatalog, pickler: ShippingPickler) -> tuple[ModuleSource, ...]:
    """The module sources a pickle made by ``pickler`` needs on the worker, in import order."""
    out: list[ModuleSource] = []
    if pickler.uses_main:
        main = catalog.main_source()
        if main is not None:
            out.extend(s for s in catalog.main_dependencies() if s not in out)
            out.append(main)
    for module in pickler.modules.values():
        for source in catalog.sources_of(module):
            if source not in out:
                out.append(source)
    return tuple(out)
