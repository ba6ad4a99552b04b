"""The small transforms, one file per family.

Every module in this package lists its public transforms in ``__all__``; they are collected here
(and re-exported by ``gradchain``). Two families exporting the same name is an error.
"""

import importlib as _importlib
import inspect as _inspect
import pkgutil as _pkgutil
import types as _types

from ..base import factory as _factory

__all__: list[str] = []
for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _module = _importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "__all__", []):
        _old = globals().get(_name)
        # importing a submodule binds its name here: a family may export a transform of that name
        if _old is not None and not isinstance(_old, _types.ModuleType) and _old is not getattr(_module, _name) \
                and getattr(_old, "__wrapped__", None) is not getattr(_module, _name):
            raise ImportError(f"gradchain.transforms: {_name!r} is exported by two families")
        _obj = getattr(_module, _name)
        if _inspect.isfunction(_obj) and not getattr(_obj, "__gradchain_factory__", False):
            # record how each transform was built, so it pickles (see gradchain.factory)
            _obj = _factory(_obj)
            setattr(_module, _name, _obj)
        globals()[_name] = _obj
        __all__.append(_name)
