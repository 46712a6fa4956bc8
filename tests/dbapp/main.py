"""A FastAPI + SQLAlchemy + alembic app on SQLite in WAL mode: the database app of proto4d's data tests.

Its schema comes only from alembic (`python -m alembic upgrade head`, run by proto4d as
`app.migrate`); the app never creates tables. `mode.txt` makes versions misbehave the way
real ones do: `write_at_start` inserts a row at start-up and then exits (a canary that
writes), `healthy` is the default. `/health` reads the database, so a schema the code
cannot use fails the health check.
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
COLUMN = "body" if MODE.startswith("body") else "text"

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
