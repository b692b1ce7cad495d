"""Module shipping: the user's modules travel by source and are imported from it on workers.

Client side: :class:`ModuleCatalog` finds which modules are the user's own (not the standard
library, not installed in site-packages, not clusterexec) and reads their source, a package as
its whole tree; :class:`ShippingPickler` notes every user module a pickle refers to and sends
functions and classes of the main script by name, as ``__mp_main__.<qualname>`` (the main
script is re-run on the worker under that name, so ``if __name__ == "__main__":`` blocks do
not run there, as with multiprocessing's spawn).

Worker side: :class:`ShippedModules` is a meta-path finder placed first on ``sys.meta_path``
that imports shipped modules from their source, and registers that source with ``linecache``
so remote tracebacks show code lines.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import linecache
import os
import pickle
import site
import sys
import sysconfig
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clusterexec.code.mainscript import names_bound_outside_main_block, rerun_blocker
from clusterexec.errors import ConfigurationError

MAIN_NAME = "__mp_main__"
_rerunning_main = False


def rerunning_main() -> bool:
    """True while a worker re-runs the client's main script (to find functions defined in it)."""
    return _rerunning_main


# Sources whose name starts with this are registered with linecache on workers, never imported:
# the main script when it is not re-run, so that its functions sent by value show their lines.
LINES_ONLY = "<lines>"

NEVER_SHIPPED = frozenset({"clusterexec", "__main__", MAIN_NAME, "builtins"})


@dataclass(frozen=True)
class ModuleSource:
    """The source of one module as shipped: name, whether it is a package, file, text."""

    name: str
    is_package: bool
    filename: str
    source: bytes
    digest: bytes


def _installed_roots() -> tuple[str, ...]:
    roots: set[str] = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(os.path.realpath(path))
    for getter in (site.getsitepackages, lambda: [site.getusersitepackages()]):
        try:
            roots.update(os.path.realpath(p) for p in getter())
        except Exception:  # site may be stripped down in embedded interpreters
            pass
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        roots.add(os.path.realpath(os.path.join(prefix, "lib")))
    return tuple(sorted(roots))


_ROOTS = _installed_roots()


def is_user_module(module: types.ModuleType) -> bool:
    """True for a module of the user's own code: a Python file outside stdlib and site-packages."""
    name = module.__name__
    if name.partition(".")[0] in NEVER_SHIPPED or name in sys.builtin_module_names:
        return False
    filename = getattr(module, "__file__", None)
    if not filename or not filename.endswith(".py"):
        return False
    path = os.path.realpath(filename)
    parts = path.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:  # installed, wherever the venv is
        return False
    return not any(path.startswith(root + os.sep) for root in _ROOTS)


def _read_source(name: str, filename: str, is_package: bool) -> ModuleSource:
    try:
        with open(filename, "rb") as f:
            source = f.read()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the source of module {name} ({filename}): {exc.strerror}") from None
    return _source_from_text(name, filename, source, is_package)


def _source_from_text(name: str, filename: str, source: bytes, is_package: bool) -> ModuleSource:
    digest = hashlib.blake2b(name.encode() + b"\0" + source, digest_size=16).digest()
    return ModuleSource(name, is_package, filename, source, digest)


def _package_tree(package: types.ModuleType) -> list[ModuleSource]:
    """Every .py file of a package, as modules named after their place in the tree."""
    out: list[ModuleSource] = []
    roots = list(getattr(package, "__path__", []))
    if not getattr(package, "__file__", None):
        # A namespace package (no __init__.py): ship an empty package module in its place.
        out.append(
            _source_from_text(package.__name__, os.path.join(roots[0] if roots else "", "__init__.py"), b"", True)
        )
    for root in roots:
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if d.isidentifier())
            relative = os.path.relpath(directory, root)
            prefix = package.__name__ if relative == "." else f"{package.__name__}.{relative.replace(os.sep, '.')}"
            if relative != "." and "__init__.py" not in files:
                subdirs[:] = []
                continue
            for file in sorted(files):
                if not file.endswith(".py") or not file[:-3].isidentifier():
                    continue
                path = os.path.join(directory, file)
                if file == "__init__.py":
                    out.append(_read_source(prefix, path, True))
                else:
                    out.append(_read_source(f"{prefix}.{file[:-3]}", path, False))
    return out


class ModuleCatalog:
    """The client's view of shippable modules: sources read once, dependencies followed.

    Thread-safe enough for its use: entries are only ever added, and a race reads a file twice.
    """

    def __init__(self, explicit: Sequence[types.ModuleType | str] = (), auto: bool = True) -> None:
        self.auto = auto
        self._sources: dict[str, tuple[ModuleSource, ...]] = {}
        self.main_names: frozenset[str] = frozenset()
        # Why the main script is not re-run on workers (its functions then travel by value).
        self.main_rerun_blocker: str | None = None
        self.explicit: tuple[ModuleSource, ...] = tuple(s for m in explicit for s in self._explicit(m))
        # Installed (not shipped) top-level packages that pickles made here referred to by name.
        self.packages: set[str] = set()
        self._not_packages: set[str] = set()

    def note_package(self, top: str) -> None:
        """Note that a pickle referred to top-level module ``top``; kept in :attr:`packages`
        if it is installed here, not the user's own code (which is shipped by source)."""
        if top in self.packages or top in self._not_packages:
            return
        module = sys.modules.get(top)
        if module is None or is_user_module(module):
            self._not_packages.add(top)
        else:
            self.packages.add(top)

    def _explicit(self, module: types.ModuleType | str) -> tuple[ModuleSource, ...]:
        if isinstance(module, str):
            try:
                module = importlib.import_module(module)
            except ImportError as exc:
                raise ConfigurationError(f"modules=: cannot import {module!r} here: {exc}") from None
        if not isinstance(module, types.ModuleType):
            raise ConfigurationError(f"modules= takes modules, packages or dotted names, not {module!r}")
        filename = getattr(module, "__file__", None)
        namespace = filename is None and hasattr(module, "__path__")
        if not namespace and (not filename or not filename.endswith(".py")):
            kind = "a C extension" if filename else "built in or frozen"
            raise ConfigurationError(
                f"modules=: module {module.__name__} has no Python source to ship ({kind}); install it on every node"
            )
        if not namespace and not is_user_module(module):
            raise ConfigurationError(
                f"modules=: {module.__name__} is installed here (standard library, site-packages or clusterexec), "
                "not your own code; install it on every node instead of shipping it"
            )
        return self.sources_of(module, follow=True)

    def sources_of(self, module: types.ModuleType, follow: bool = True) -> tuple[ModuleSource, ...]:
        """The sources to ship for ``module``: its top-level package's whole tree (or the module
        itself), plus, with ``follow``, the user modules those refer to."""
        top_name = module.__name__.partition(".")[0]
        top = sys.modules.get(top_name, module)
        key = top.__name__
        cached = self._sources.get(key)
        if cached is not None:
            return cached
        own: list[ModuleSource] = []
        if hasattr(top, "__path__"):
            own = _package_tree(top)
        elif getattr(top, "__file__", None):
            own = [_read_source(top.__name__, top.__file__, False)]  # type: ignore[arg-type]
        self._sources[key] = tuple(own)
        if follow:
            extra: list[ModuleSource] = []
            for dependency in _referenced_user_modules(top, own):
                extra.extend(s for s in self.sources_of(dependency) if s not in own and s not in extra)
            self._sources[key] = tuple(own) + tuple(extra)
        return self._sources[key]

    def main_source(self) -> ModuleSource | None:
        """The main script's source (None if interactive): re-run as ``__mp_main__`` on workers
        when that is harmless, else shipped only so that tracebacks show its lines."""
        cached = self._sources.get(MAIN_NAME)
        if cached is not None:
            return cached[0] if cached else None
        main = sys.modules.get("__main__")
        filename = getattr(main, "__file__", None)
        if main is None or not filename or not filename.endswith(".py") or not os.path.exists(filename):
            self._sources[MAIN_NAME] = ()
            return None
        source = _read_source(MAIN_NAME, filename, False)
        self.main_rerun_blocker = rerun_blocker(source.source)
        if self.main_rerun_blocker is not None:
            source = _source_from_text(LINES_ONLY + filename, filename, source.source, False)
        else:
            self.main_names = names_bound_outside_main_block(source.source)
            sys.modules.setdefault(MAIN_NAME, main)
        self._sources[MAIN_NAME] = (source,)
        return source

    def main_dependencies(self) -> tuple[ModuleSource, ...]:
        """The user modules the main script refers to (shipped along with it)."""
        cached = self._sources.get("__main__ dependencies")
        if cached is not None:
            return cached
        main = sys.modules.get("__main__")
        out: list[ModuleSource] = []
        if main is not None:
            for dependency in _referenced_user_modules(main, []):
                out.extend(s for s in self.sources_of(dependency) if s not in out)
        self._sources["__main__ dependencies"] = tuple(out)
        return tuple(out)

    def by_name_in_main(self, qualname: str) -> bool:
        """True if ``qualname`` is bound by the main script when re-run under another name
        (never when re-running the script is not harmless)."""
        return self.main_source() is not None and qualname.partition(".")[0] in self.main_names


def _referenced_user_modules(top: types.ModuleType, own: Sequence[ModuleSource]) -> list[types.ModuleType]:
    """User modules outside ``top``'s package that the modules of ``own`` (or ``top`` itself,
    when ``own`` is empty) refer to by a module, function or class in their globals."""
    scanned = [sys.modules.get(s.name) for s in own] if own else [top]
    found: list[types.ModuleType] = []
    for module in scanned:
        if module is None:
            continue
        for value in list(vars(module).values()):
            candidate: types.ModuleType | None = None
            if isinstance(value, types.ModuleType):
                candidate = value
            else:
                owner = getattr(value, "__module__", None)
                if isinstance(owner, str) and isinstance(value, (type, types.FunctionType)):
                    candidate = sys.modules.get(owner)
            if (
                candidate is not None
                and candidate.__name__.partition(".")[0] != top.__name__
                and is_user_module(candidate)
                and candidate not in found
            ):
                found.append(candidate)
    return found


def resolve_main(qualname: str) -> Any:
    """Find a function or class of the re-run main script on a worker, by qualified name."""
    current = sys.modules.get(MAIN_NAME)
    if current is not None and not isinstance(getattr(current, "__loader__", None), ShippedModules):
        # Importing multiprocessing (dask does, say, while the task's function is unpickled)
        # aliases __mp_main__ to the worker's own __main__ again, after the script arrived.
        if any(isinstance(f, ShippedModules) and MAIN_NAME in f.sources for f in sys.meta_path):
            del sys.modules[MAIN_NAME]
    obj: Any = importlib.import_module(MAIN_NAME)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def main_toplevel_qualname(obj: Any) -> str | None:
    if getattr(obj, "__module__", None) != "__main__":
        return None
    qualname = getattr(obj, "__qualname__", "")
    if not qualname or "<" in qualname:
        return None
    target: Any = sys.modules.get("__main__")
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return qualname if target is obj else None


# --------------------------------------------------------------------------- worker side


def encode_sources(sources: Iterable[ModuleSource]) -> tuple[bytes, list[bytes]]:
    """A MODULES message body (the table, plainly pickled) and its buffers (the sources)."""
    items = list(sources)
    table = [(s.name, s.is_package, s.filename, s.digest) for s in items]
    return pickle.dumps(table, 5), [s.source for s in items]


if TYPE_CHECKING:
    from importlib.abc import Loader, MetaPathFinder

    class _FinderBase(MetaPathFinder, Loader):
        """What the import system sees (for the type checker)."""

else:
    # The import protocol is duck-typed; importlib.abc would pull in importlib.resources,
    # tempfile and shutil at every node start.
    _FinderBase = object


class ShippedModules(_FinderBase):
    """A meta-path finder serving the modules shipped by the client, first on ``sys.meta_path``."""

    def __init__(self) -> None:
        self.sources: dict[str, ModuleSource] = {}

    def install(self) -> None:
        """Put this finder first on ``sys.meta_path`` (once)."""
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def add(self, body: Any, buffers: Sequence[Any]) -> None:
        """Register the modules of a MODULES message (the table is plain data, no code)."""
        table = pickle.loads(body)
        for (name, is_package, filename, digest), source in zip(table, buffers, strict=True):
            text = bytes(source)
            self.sources[name] = ModuleSource(name, is_package, filename, text, digest)
            lines = text.decode("utf-8", errors="replace").splitlines(keepends=True)
            linecache.cache[filename] = (len(text), None, lines, filename)
            if name == MAIN_NAME and getattr(sys.modules.get(name), "__loader__", None) is not self:
                # multiprocessing aliases __mp_main__ to the node's own __main__: replace it.
                sys.modules.pop(name, None)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        """Find a shipped module by name."""
        shipped = self.sources.get(fullname)
        if shipped is None:
            return None
        spec = importlib.util.spec_from_loader(fullname, self, origin=shipped.filename, is_package=shipped.is_package)
        if spec is not None:
            spec.has_location = True
            if shipped.is_package:
                spec.submodule_search_locations = []
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        """Default module creation."""
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        """Run a shipped module's source; errors name the module."""
        shipped = self.sources[module.__name__]
        module.__file__ = shipped.filename
        if module.__name__ == MAIN_NAME:
            sys.modules["__main__"] = module
        try:
            code = compile(shipped.source, shipped.filename, "exec", dont_inherit=True)
        except SyntaxError as exc:
            if hasattr(exc, "add_note"):
                exc.add_note(f"in module {shipped.name}, shipped by the client")
            raise
        global _rerunning_main
        outer, _rerunning_main = _rerunning_main, module.__name__ == MAIN_NAME or _rerunning_main
        try:
            exec(code, module.__dict__)
        finally:
            _rerunning_main = outer
