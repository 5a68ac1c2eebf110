"""Progress while a round waits: ``round 2: 4 of 10 train replies`` as the replies arrive.

Flower's ``Strategy.start`` waits in ``grid.send_and_receive`` and logs
nothing until every reply is in or the round times out, so a 3-minute round
looks hung. :class:`ProgressGrid` wraps the Grid that ``start`` is given and
does what Flower's Grids do in ``send_and_receive`` (push the messages, then
pull replies until all are in or ``timeout`` passes), logging a line each
time new replies arrive.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO
from typing import Any

from flwr.app import Message, MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid

from raffm_core.task.keys import CONFIG, SERVER_ROUND

STAGES = {MessageType.TRAIN: "train", MessageType.EVALUATE: "evaluate"}


class ProgressGrid:
    """A Grid that logs the replies of train and evaluate messages as they arrive.

    Every other attribute is the wrapped Grid's. A Grid without
    ``push_messages``/``pull_messages`` (the tests' stand-ins) answers
    ``send_and_receive`` itself, without progress lines.

    Parameters
    ----------
    grid : Grid
    poll_s : float
        Seconds between two pulls (Flower's own Grid waits 3 s).
    arrivals : dict, optional
        Filled with ``{instruction message id: seconds from the push to its
        reply's arrival}`` for the last train or evaluate send (cleared at
        each), which the strategy records per client (``reply-after-s``).
    """

    def __init__(
        self, grid: Grid, poll_s: float = 0.25, arrivals: dict[str, float] | None = None
    ) -> None:
        self._grid = grid
        self._poll_s = poll_s
        self.arrivals = {} if arrivals is None else arrivals

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Push ``messages``, pull their replies until all are in or ``timeout`` passes."""
        messages = list(messages)
        stage = STAGES.get(messages[0].metadata.message_type) if messages else None
        if stage is None or not hasattr(self._grid, "pull_messages"):
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        config = messages[0].content.config_records.get(CONFIG)
        server_round = config.get(SERVER_ROUND, "?") if config is not None else "?"
        self.arrivals.clear()
        pushed_at = time.monotonic()
        waiting = set(self._grid.push_messages(messages))
        total = len(waiting)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            new = list(self._grid.pull_messages(waiting))
            if new:
                arrived = time.monotonic() - pushed_at
                for m in new:
                    self.arrivals[m.metadata.reply_to_message_id] = arrived
                replies.extend(new)
                waiting.difference_update(m.metadata.reply_to_message_id for m in new)
                log(
                    INFO,
                    "round %s: %d of %d %s replies",
                    server_round,
                    total - len(waiting),
                    total,
                    stage,
                )
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self._poll_s)
        return replies
