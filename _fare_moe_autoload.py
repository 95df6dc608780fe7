"""Post-import hook for lm-eval, loaded by ``fare_moe.pth`` (see fare_models/discovery.py).

Stdlib only and nothing imported eagerly: interpreter start-up must not get slower.
"""

import os
import sys

_HOOKS = {
    "lm_eval.models": "register_model",
    "lm_eval.tasks.manager": "register_tasks",
}


class _Loader:
    def __init__(self, loader, action):
        self._loader, self._action = loader, action

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            from fare_models import discovery

            getattr(discovery, self._action)(module)
        except Exception as e:  # never break lm-eval because of us
            print(f"fare-moe: could not register with lm-eval ({e!r})", file=sys.stderr)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder:
    """Wraps the loader of the watched lm-eval modules; every other import passes straight through."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        action = _HOOKS.get(fullname)
        if action is None:
            return None
        for finder in sys.meta_path:
            if finder is _Finder or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, action)
                return spec
        return None


def install():
    if os.environ.get("FARE_MOE_NO_AUTOLOAD") or _Finder in sys.meta_path:
        return
    sys.meta_path.insert(0, _Finder)
    for name, action in _HOOKS.items():  # lm-eval already imported (e.g. installed mid-session)
        if name in sys.modules:
            try:
                from fare_models import discovery

                getattr(discovery, action)(sys.modules[name])
            except Exception:
                pass


install()
