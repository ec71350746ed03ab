"""``python -m data_prep inspect DIR``: see exactly what the model will learn from.

Each token is printed with its role (CTX dim, GEN green, RET bold magenta), followed, for every
RET position, by its positive document and its mined negatives with their provenance.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.text import Text

from data_prep.tokenizer import load_tokenizer
from onegen.manifest import read_manifest
from onegen.roles import CTX, GEN, RET
from onegen.shards import list_shards, load_shards

STYLE = {CTX: "dim", GEN: "green", RET: "bold magenta"}


def render_row(tokenizer, input_ids, roles) -> Text:
    # Decode runs of one role together: byte-level BPE splits a character over several tokens.
    text = Text()
    start = 0
    for end in range(1, len(roles) + 1):
        if end == len(roles) or roles[end] != roles[start] or roles[start] == RET:
            piece = tokenizer.decode(list(input_ids[start:end]))
            role = roles[start]
            text.append(piece if role != RET else f"⟦{piece}⟧", style=STYLE.get(role, "red"))
            start = end
    return text


def inspect(directory: str | Path, n: int = 3, start: int = 0, console: Console | None = None) -> None:
    console = console or Console()
    directory = Path(directory)
    manifest = read_manifest(directory, expect_stage="data_prep")
    tokenizer = load_tokenizer(str(directory / "tokenizer"))
    queries = load_shards(list_shards(directory / "queries"))
    docs = load_shards(list_shards(directory / "docs"))
    titles = dict(zip(docs["doc_id"], docs["title"]))
    c = manifest["counts"]
    console.print(f"[bold]{directory}[/]  task={manifest['task']}  queries={c['queries']}  docs={c['docs']}  "
                  f"RET tokens={c['ret_tokens']}  quarantined={c['quarantined']}  fingerprint={manifest['fingerprint'][:12]}")
    console.print("roles: [dim]CTX (no loss)[/]  [green]GEN (next-token loss)[/]  [bold magenta]⟦RET⟧ (embedding)[/]\n")
    for i in range(start, min(start + n, len(queries))):
        row = queries[i]
        console.rule(f"query {i}: {row['example_id']}  ({len(row['input_ids'])} tokens, prompt {row['prompt_len']})")
        console.print(render_row(tokenizer, row["input_ids"], row["roles"]))
        for j, (pos, positive) in enumerate(zip(row["ret_positions"], row["positives"])):
            console.print(f"  RET #{j} at token {pos}: [bold]+[/] {positive} ({titles.get(positive, '?')})")
            for neg, src in zip(row["negatives"][j], row["neg_source"][j]):
                console.print(f"      [red]-[/] {neg} ({titles.get(neg, '?')})  [dim]{src}[/]")
    if len(docs):
        console.rule("a document row")
        d = docs[0]
        console.print(render_row(tokenizer, d["input_ids"], d["roles"]))
