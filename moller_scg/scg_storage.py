"""Where :class:`~moller_scg.SCG` keeps its vectors: the residual r = −E'(w), the search direction p and the copy
of the accepted weights w taken before each trial.

r and p live in ``optimizer.state[param]`` under ``"residual"`` and ``"direction"``, as ``torch.optim`` expects, so
``state_dict`` saves them per parameter. How they are laid out depends on the mode:

- Møller's SCG (m = 0) keeps them as separate per-parameter tensors;
- the preconditioned mode (m ≥ 1) keeps them in flat buffers of n numbers whenever the parameters share a device
  and a dtype (:mod:`moller_scg.flat_vector`), and ``optimizer.state`` then holds views of those buffers.

:class:`_StateVectors` hides that choice from the iteration: it hands out r and p as the vector operations take
them (``[flat r]``, ``[flat p]`` on the fast path), their per-parameter form for operations that pair them with
the parameters (w + αp), writes r₊ and p₊ = H r₊ (step 7) where they belong, and remembers the inner products |r|²,
μ = pᵀr and |p|² of the r and p it holds, so that the next step need not form them again. It holds nothing that
outlives the optimizer object: a pickled, copied or loaded SCG starts with a fresh one, and the flat buffers are
gathered again from ``optimizer.state`` (whose loaded r and p :func:`_copy_loaded_vectors` makes SCG's own).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import numpy as np
import torch

from moller_scg import _vectors as vec
from moller_scg.flat_vector import FlatBuffers, FlatLayout
from moller_scg.quasi_newton import PreparedAdvance, SecantPairs

_State = MutableMapping[torch.Tensor, Any]
"""``optimizer.state``: each parameter's dict, with r under ``"residual"`` and p under ``"direction"``."""


class _StateVectors:
    """SCG's r and p (in ``optimizer.state``, flat or per parameter) and the inner products of the ones held.

    Attributes:
        flat: the flat buffers of r, p and the accepted w on the fast path (m ≥ 1, one device and dtype), else
            ``None``.
    """

    def __init__(self) -> None:
        self.flat: FlatBuffers | None = None
        # (the tensors of r and p, their versions, (|r|², pᵀr, |p|²)) as remember_products last saw them
        self._known_products: tuple[list[torch.Tensor], list[int], tuple[float, float, float]] | None = None
        # The secant pair's products that step 6 formed with its own (trial_products), for step 7's pair.
        self._prepared: PreparedAdvance | None = None

    def start(self, state: _State, params: list[torch.Tensor], gradients: list[torch.Tensor], memory: int) -> None:
        """Step 1's vectors: r₁ = −E'(w₁) and p₁ = r₁, in flat buffers on the fast path (m ≥ 1)."""
        if memory > 0 and FlatLayout.fits(params):
            if self.flat is None or not self.flat.layout.matches(params):
                self.flat = FlatBuffers(FlatLayout(params))
            flat = self.flat
            flat.layout.gather(gradients, out=flat.residual).neg_()
            flat.direction.copy_(flat.residual)
            self._point_state_at(state, params, flat)
        else:
            self.flat = None
            for p, r in zip(params, vec.negated(gradients)):
                state[p]["residual"] = r
                state[p]["direction"] = r.clone()

    def hold_in_flat_buffers(self, state: _State, params: list[torch.Tensor], memory: int) -> None:
        """On the fast path (:mod:`moller_scg.flat_vector`), make sure ``optimizer.state``'s r and p are views of the
        flat buffers: after a ``load_state_dict``, a copy or an assignment by hand they are separate tensors, and
        are gathered into new buffers (same numbers)."""
        if memory == 0:
            return  # Møller's SCG keeps r and p per parameter (self.flat stays None)
        if self.flat is not None and self.flat.is_held_by(state, params):
            return
        residual = [state[p]["residual"] for p in params]
        direction = [state[p]["direction"] for p in params]
        if not FlatLayout.fits(params):
            self.flat = None
            return
        known = self._remembered(residual + direction)  # a loaded state's saved products, say
        # New buffers, not the old ones: a state tensor may still be a view of them.
        flat = FlatBuffers(FlatLayout(params))
        flat.layout.gather(residual, out=flat.residual)
        flat.layout.gather(direction, out=flat.direction)
        self._point_state_at(state, params, flat)
        self.flat = flat
        if known is not None:  # the same numbers, gathered: their products too
            self.remember_products(state, params, known)

    def residual_and_direction(
        self, state: _State, params: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """r and p as the vector operations take them: ``[flat r]``, ``[flat p]`` on the fast path (memory ≥ 1), the
        per-parameter tensors of ``optimizer.state`` otherwise."""
        if self.flat is not None:
            return [self.flat.residual], [self.flat.direction]
        return [state[p]["residual"] for p in params], [state[p]["direction"] for p in params]

    def per_parameter(self, vector: list[torch.Tensor]) -> list[torch.Tensor]:
        """r or p one tensor per parameter, for operations that pair them with the parameters (w + αp)."""
        return self.flat.per_parameter(vector[0]) if self.flat is not None else vector

    def negated(self, gradients: list[torch.Tensor]) -> list[torch.Tensor]:
        """r₊ = −E'(w₊) laid out like r: new tensors, or on the fast path the flat buffer of r₊
        (:attr:`FlatBuffers.new_residual <moller_scg.flat_vector.FlatBuffers.new_residual>`, overwritten by the next
        trial)."""
        if self.flat is not None:  # one copy into the per-parameter views, not a reshape of each and a cat
            vec.copy_(self.flat.new_residual_views, gradients)
            return [self.flat.new_residual.neg_()]
        return vec.negated(gradients)

    def keep_residual(self, state: _State, params: list[torch.Tensor], new_residual: list[torch.Tensor]) -> None:
        """r ← r₊ (step 7, after a success): into the flat buffer on the fast path, in ``optimizer.state`` otherwise."""
        if self.flat is not None:
            self.flat.residual.copy_(new_residual[0])
        else:
            for p, r in zip(params, new_residual):
                state[p]["residual"] = r

    def quasi_newton_direction(
        self,
        pairs: SecantPairs,
        direction: list[torch.Tensor],
        alpha: float,
        residual: list[torch.Tensor],
        new_residual: list[torch.Tensor],
    ) -> tuple[float, float]:
        """Step 7 with memory: keep the pair (s, y) = (αp, r − r₊) of the accepted step, then p ← H r₊ in p's storage
        (straight into the flat buffer on the fast path).

        Returns |p₊|² and p₊ᵀr₊ (the next μ), formed from the tensors :meth:`residual_and_direction` gives (the flat
        buffers on the fast path) as :meth:`products` would form them after a ``load_state_dict``, so a resumed run
        takes the same bits. On the fast path the pair update uses the flat buffers of p and r₊ and the scratch row of
        y (:attr:`FlatBuffers.pair_rows <moller_scg.flat_vector.FlatBuffers.pair_rows>`) and allocates no
        weight-sized tensor; otherwise it holds one 3 × n buffer (y, p and r₊ flattened) and H r₊ besides the stored
        pairs (:meth:`SecantPairs.advance <moller_scg.quasi_newton.SecantPairs.advance>`).
        """
        prepared, self._prepared = self._prepared, None
        if self.flat is not None:  # direction and new_residual are the flat buffers of p and r₊
            pairs.advance_flat(self.flat.pair_rows, alpha, residual[0], prepared)
            if self.flat.fuses_products:
                new_direction_sq, new_mu = self.flat.products_with_direction()
                return new_direction_sq, new_mu
        else:
            vec.copy_(direction, pairs.advance(direction, alpha, residual, new_residual))
        new_direction_sq, new_mu = vec.dots([(direction, direction), (direction, new_residual)])
        return new_direction_sq, new_mu

    def trial_products(
        self,
        new_residual: list[torch.Tensor],
        residual: list[torch.Tensor],
        direction: list[torch.Tensor],
        pairs: SecantPairs | None = None,
    ) -> tuple[float, float, float]:
        """(|r₊|², r₊ᵀr, r₊ᵀp) of step 6, for r₊, r and p as :meth:`negated` and :meth:`residual_and_direction` hand
        them out: one product of the flat buffers' rows on the fast path for small n (unless p is not the stored
        direction: the steepest-descent fallback searches along r), the same bits as :func:`~moller_scg._vectors.dots`
        otherwise.

        When the flat buffers are float64 NumPy rows (:attr:`FlatBuffers.host_rows
        <moller_scg.flat_vector.FlatBuffers.host_rows>`) and ``pairs`` are worked on in NumPy too, the products of the
        secant pair that step 7 keeps if it accepts come from the same two NumPy products
        (:meth:`SecantPairs.prepare_advance <moller_scg.quasi_newton.SecantPairs.prepare_advance>`), held for
        :meth:`quasi_newton_direction`.
        """
        flat = self.flat
        self._prepared = None
        if flat is not None and flat.fuses_products and direction[0] is flat.direction:
            if flat.host_rows is not None and pairs is not None and pairs.on_host:
                self._prepared = pairs.prepare_advance(flat.host_rows)
                _, new_dot_direction, new_residual_sq, new_dot_old = self._prepared.gram[2].tolist()
                return new_residual_sq, new_dot_old, new_dot_direction
            new_dot_direction, new_residual_sq, new_dot_old = flat.products_with_new_residual()
            return new_residual_sq, new_dot_old, new_dot_direction
        new_residual_sq, new_dot_old, new_dot_direction = vec.dots(
            [(new_residual, new_residual), (new_residual, residual), (new_residual, direction)]
        )
        return new_residual_sq, new_dot_old, new_dot_direction

    def observe_gradient(self, pairs: SecantPairs, new_residual: list[torch.Tensor]) -> None:
        """An accepted r₊ into the pairs' diagonal scaling, when the step restarts and forms no pair (the flat buffer of
        r₊ on the fast path, one tensor per parameter otherwise)."""
        if self.flat is not None:
            pairs.observe_flat(new_residual[0])
        else:
            pairs.observe(new_residual)

    def copy_of_weights(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The accepted w, copied before the trial: into the flat buffer's views on the fast path, new tensors
        otherwise."""
        if self.flat is None:
            return vec.clone(params)
        vec.copy_(self.flat.accepted_views, params)
        return self.flat.accepted_views

    def products(self, residual: list[torch.Tensor], direction: list[torch.Tensor]) -> tuple[float, float, float]:
        """(|r|², μ = pᵀr, |p|²) of the state's r and p.

        The previous step already formed them for its trace and its successor (:meth:`remember_products`); they are
        reused when r and p are still the same tensors, unmodified since (a loaded state brings the ones it was saved
        with: :meth:`held_products`), and computed otherwise (when something wrote into the state, or from a state
        saved without them) — on the fast path in float64 not always in the same last bits.
        """
        known = self._remembered(residual + direction)
        if known is not None:
            return known
        residual_sq, mu, direction_sq = vec.dots([(residual, residual), (direction, residual), (direction, direction)])
        return residual_sq, mu, direction_sq

    def squared_norm(self, vector: list[torch.Tensor]) -> float:
        """|v|² of r or p as :meth:`residual_and_direction` hands them out: through NumPy on the fast path in float64
        (:attr:`FlatBuffers.host_rows <moller_scg.flat_vector.FlatBuffers.host_rows>`), else summed in float64 by
        :func:`~moller_scg._vectors.squared_norm`."""
        row = self._host_row(vector)
        return float(row @ row) if row is not None else vec.squared_norm(vector)

    def _host_row(self, vector: list[torch.Tensor]) -> np.ndarray | None:
        """The NumPy view of r or p (whichever ``vector`` is) on the fast path in float64, else ``None``."""
        flat = self.flat
        if flat is None or flat.host_rows is None:
            return None
        if vector[0] is flat.residual:
            return flat.host_rows[3]
        if vector[0] is flat.direction:
            return flat.host_rows[1]
        return None

    def held_products(self, state: _State, params: list[torch.Tensor]) -> tuple[float, float, float] | None:
        """(|r|², μ = pᵀr, |p|²) of the r and p in the state, as the last step formed them, or ``None`` if they were
        replaced or written to since (what ``state_dict`` saves, so that a resume takes the same bits: the NumPy
        products of the fast path in float64 are not the ones :meth:`products` would form again)."""
        residual, direction = self.residual_and_direction(state, params)
        return self._remembered(residual + direction)

    def _remembered(self, tensors: list[torch.Tensor]) -> tuple[float, float, float] | None:
        """The products :meth:`remember_products` kept, if it kept them for these tensors, unmodified since."""
        if self._known_products is None:
            return None
        known_tensors, known_versions, products = self._known_products
        if len(known_tensors) != len(tensors) or not all(a is b for a, b in zip(known_tensors, tensors)):
            return None
        return products if known_versions == [t._version for t in tensors] else None

    def remember_products(
        self, state: _State, params: list[torch.Tensor], products: tuple[float, float, float]
    ) -> None:
        """Keep (|r|², pᵀr, |p|²) of the r and p now in the state for :meth:`products`."""
        residual, direction = self.residual_and_direction(state, params)
        tensors = residual + direction
        self._known_products = (tensors, [t._version for t in tensors], products)

    @staticmethod
    def _point_state_at(state: _State, params: list[torch.Tensor], flat: FlatBuffers) -> None:
        """Make ``optimizer.state``'s r and p of each parameter the views of the flat buffers."""
        for p, r, d in zip(params, flat.residual_views, flat.direction_views):
            state[p]["residual"] = r
            state[p]["direction"] = d


_VECTOR_KEYS = ("residual", "direction")
"""The entries of a parameter's dict in ``optimizer.state`` that hold SCG's vectors r and p."""


def _vectors_of_their_own(param_states: dict[Any, Any]) -> dict[Any, Any]:
    """The per-parameter state dicts with r and p as tensors of their own: copies of the views of SCG's flat buffers
    (new dicts; ``optimizer.state`` is left as it is), other entries as they are.

    On the fast path r and p are rows of the (4, n) buffer they share with r₊ and y
    (:attr:`FlatBuffers.rows <moller_scg.flat_vector.FlatBuffers.rows>`), and ``torch.save``, ``pickle`` and
    ``copy.deepcopy`` keep a view's whole storage: a saved state would hold 4n numbers for each. Copied, r and p
    take n numbers each, as with Møller's SCG, whose per-parameter tensors are left as they are.
    """

    result = dict(param_states)
    for key, entries in param_states.items():
        if not isinstance(entries, dict):
            continue
        result[key] = dict(entries)
        for name in _VECTOR_KEYS:
            value = entries.get(name)
            if isinstance(value, torch.Tensor) and value.untyped_storage().nbytes() > value.nbytes:
                result[key][name] = value.clone()
    return result


def _copy_loaded_vectors(state: _State) -> None:
    """Replace r and p of a just-loaded ``optimizer.state`` by copies of themselves.

    torch keeps a loaded tensor that already has the parameter's dtype and device, so r and p would be shared with
    the caller's dict (or with the optimizer it came from); step 7 updates p in place, so SCG copies them. Hooks may
    keep entries of their own in ``optimizer.state`` (torch's tests put a bool there): only the parameters' dicts
    hold r and p.
    """
    for param_state in state.values():
        if not isinstance(param_state, dict):
            continue
        for key in _VECTOR_KEYS:
            if isinstance(param_state.get(key), torch.Tensor):
                param_state[key] = param_state[key].clone()
