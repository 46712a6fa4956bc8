"""A FastAPI + SQLAlchemy + alembic app on SQLite in WAL mode: the database app of proto4d's data tests.

Its schema comes only from alembic (`python -m alembic upgrade head`, run by proto4d as
`app.migrate`); the app never creates tables. `mode.txt` makes versions misbehave the way
real ones do: `write_at_start` inserts a row at start-up and then exits (a canary that
writes); `body` reads and writes the column the destructive migration renames;
`crash_on_post N` exits on the Nth POST (after N-1 acknowledged rows; health checks never
trigger it, so the canary passes and production crashes); `healthy` is the default.
`/health` reads the database, so a schema the code cannot use fails the health check.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel
from sqlalchemy import create_engine, event, text

HERE = Path(__file__).resolve().parent
VERSION = (HERE / "VERSION").read_text().strip() if (HERE / "VERSION").exists() else "0"
MODE = (HERE / "mode.txt").read_text().strip() if (HERE / "mode.txt").exists() else "healthy"
# Relative to the working directory, as Proto4 does: the canary's copy when run from its tree.
URL = os.environ.get("DBAPP_URL", "sqlite:///data/app.db")
# v1 writes `text`; from v3 on (the destructive migration) the column is `body`.
COLUMN = "body" if "body" in MODE.split() else "text"
_words = MODE.split()
CRASH_ON_POST = int(_words[_words.index("crash_on_post") + 1]) if "crash_on_post" in _words else 0
_posts = 0

engine = create_engine(URL, connect_args={"timeout": 30})


@event.listens_for(engine, "connect")
def _wal(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


if MODE == "write_at_start":
    with engine.begin() as c:
        c.execute(text(f"INSERT INTO answers ({COLUMN}) VALUES ('written by a version that then fails')"))
    print("dbapp: wrote a row at start, now failing as mode.txt asks", file=sys.stderr, flush=True)
    sys.exit(3)

app = FastAPI()


class Answer(BaseModel):
    text: str


@app.get("/health")
def health(response: Response) -> dict:
    try:
        with engine.connect() as c:
            c.execute(text(f"SELECT id, {COLUMN} FROM answers LIMIT 1")).fetchall()
    except Exception as e:  # the schema is not what this code needs
        response.status_code = 503
        return {"ok": False, "error": type(e).__name__}
    return {"ok": True, "version": VERSION}


@app.get("/")
def index() -> dict:
    return {"version": VERSION, "mode": MODE, "pid": os.getpid()}


@app.post("/answers")
def add(answer: Answer) -> dict:
    global _posts
    _posts += 1
    if CRASH_ON_POST and _posts >= CRASH_ON_POST:
        print(f"dbapp: crashing on POST {_posts} as mode.txt asks", file=sys.stderr, flush=True)
        os._exit(4)
    with engine.begin() as c:
        new_id = c.execute(text(f"INSERT INTO answers ({COLUMN}) VALUES (:t) RETURNING id"),
                           {"t": answer.text}).scalar_one()
    return {"id": new_id, "version": VERSION}


@app.get("/answers/{answer_id}")
def get(answer_id: int) -> dict:
    with engine.connect() as c:
        row = c.execute(text(f"SELECT {COLUMN} FROM answers WHERE id = :i"), {"i": answer_id}).fetchone()
    if row is None:
        raise HTTPException(404)
    return {"id": answer_id, "text": row[0]}
