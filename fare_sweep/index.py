"""The results index: one SQLite file ``DIR/index.sqlite``, written by the sweep driver only.

Tables (documented in the README, section "Sweeps")::

    cells(cell_id PK, cell_key UNIQUE, label, model, revision, method, params JSON, p, tasks JSON,
          status pending|running|done|failed, attempts, error, traceback, host, pid, path,
          checkpoint, started_at, finished_at)
    metrics(cell_id, task, metric, filter, value, stderr)   PK (cell_id, task, metric, filter)
    timings(cell_id, stage compress|evaluate|total, seconds) PK (cell_id, stage)
    sweep(name PK, value)                                    driver host/pid, executor

Every cell's completion is one transaction (status, metrics and timings together), so a kill at
any point leaves a cell either fully recorded or not at all; primary keys rule out duplicate rows.
Per-item samples stay where lm-eval writes them (``cells/<cell_id>/<model>/samples_*.jsonl``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from .evaluate import metric_rows
from .grid import Cell

INDEX = "index.sqlite"
STATUSES = ("pending", "running", "done", "failed")
SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    cell_id TEXT PRIMARY KEY, cell_key TEXT UNIQUE NOT NULL, label TEXT, model TEXT, revision TEXT,
    method TEXT, params TEXT, p REAL, tasks TEXT,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0, error TEXT, traceback TEXT, host TEXT, pid INTEGER, path TEXT,
    checkpoint TEXT, started_at REAL, finished_at REAL);
CREATE TABLE IF NOT EXISTS metrics (
    cell_id TEXT NOT NULL REFERENCES cells(cell_id), task TEXT NOT NULL, metric TEXT NOT NULL,
    filter TEXT NOT NULL, value REAL, stderr REAL, PRIMARY KEY (cell_id, task, metric, filter));
CREATE TABLE IF NOT EXISTS timings (
    cell_id TEXT NOT NULL REFERENCES cells(cell_id), stage TEXT NOT NULL, seconds REAL,
    PRIMARY KEY (cell_id, stage));
CREATE TABLE IF NOT EXISTS sweep (name TEXT PRIMARY KEY, value TEXT);
"""


class Index:
    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / INDEX
        self.conn = sqlite3.connect(self.path, timeout=30)
        self.conn.row_factory = sqlite3.Row
        with self.conn:
            self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def set_meta(self, **values) -> None:
        with self.conn:
            self.conn.executemany("INSERT OR REPLACE INTO sweep VALUES (?, ?)",
                                  [(k, json.dumps(v)) for k, v in values.items()])

    def meta(self) -> dict:
        return {r["name"]: json.loads(r["value"]) for r in self.conn.execute("SELECT * FROM sweep")}

    def add_cells(self, cells: list[Cell]) -> None:
        """Register the grid's cells as pending (cells already known keep their status)."""
        with self.conn:
            self.conn.executemany(
                "INSERT OR IGNORE INTO cells (cell_id, cell_key, label, model, revision, method, params, p, tasks,"
                " status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
                [(c.cell_id(), c.key(), c.label(), c.model_id, c.revision, c.method,
                  json.dumps(c.params, sort_keys=True), c.p, json.dumps(c.eval["tasks"])) for c in cells])

    def mark_running(self, cell_id: str, host: str | None = None, pid: int | None = None) -> None:
        with self.conn:
            self.conn.execute(
                "UPDATE cells SET status='running', attempts=attempts+1, started_at=?, host=?, pid=?, error=NULL,"
                " traceback=NULL WHERE cell_id=?", (time.time(), host, pid, cell_id))

    def record_done(self, record: dict, cell_dir: Path) -> None:
        """One transaction: status done, every metric of lm-eval's results file, the timings."""
        results = json.loads((Path(cell_dir) / record["results_file"]).read_text())
        cid = record["cell_id"]
        with self.conn:
            self.conn.execute(
                "UPDATE cells SET status='done', error=NULL, traceback=NULL, path=?, checkpoint=?, host=?, pid=?,"
                " finished_at=? WHERE cell_id=?",
                (str(cell_dir), record.get("checkpoint"), record["worker"]["host"], record["worker"]["pid"],
                 time.time(), cid))
            self.conn.execute("DELETE FROM metrics WHERE cell_id=?", (cid,))
            self.conn.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?)",
                                  [(cid, *row) for row in metric_rows(results)])
            self.conn.execute("DELETE FROM timings WHERE cell_id=?", (cid,))
            self.conn.executemany("INSERT INTO timings VALUES (?, ?, ?)",
                                  [(cid, k, v) for k, v in record["timings"].items()])

    def record_failed(self, cell_id: str, error: str, traceback: str | None = None) -> None:
        with self.conn:
            self.conn.execute("UPDATE cells SET status='failed', error=?, traceback=?, finished_at=? WHERE cell_id=?",
                              (error, traceback, time.time(), cell_id))

    def rows(self) -> list[sqlite3.Row]:
        return list(self.conn.execute("SELECT * FROM cells ORDER BY rowid"))
