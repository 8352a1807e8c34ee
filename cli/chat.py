"""The interactive ``lifealign-lite chat`` loop: slash commands, Ctrl-C that stops an answer (never the session),
line editing and a persistent history."""

from __future__ import annotations

from pathlib import Path

from .common import home_dir, out

CHAT_HELP = """/domain NAME   answer from NAME's memory (a domain, auto, core or base); /domain alone shows the current one
/reset         forget the conversation so far
/help          this list
/bye, /exit, /quit (or Ctrl-D)   leave
Ctrl-C stops an answer and returns to the prompt; arrow keys edit the line, up and down recall earlier lines."""


def chat_loop(session, max_new_tokens: int) -> None:
    """The interactive loop: Ctrl-C stops an answer (never the session), readline edits lines and keeps history."""
    from lifealign_lite.memory.adapter import BankError

    history = _line_editing(home_dir() / "chat_history")
    out.print(f"[bold]lifealign-lite chat[/] ({session.engine})  domains: {', '.join(session.available())}  (/help for commands, /bye to leave)")
    try:
        while True:
            try:
                text = input(f"[{session.domain}] you> ").strip()
            except EOFError:
                out.print()
                return
            except KeyboardInterrupt:
                out.print("\n[dim](/bye or Ctrl-D leaves)[/]")
                continue
            if not text:
                continue
            command, _, arg = text.partition(" ")
            if command in ("/bye", "/exit", "/quit"):
                return
            if command == "/help":
                out.print(CHAT_HELP, markup=False, highlight=False)
            elif command == "/reset":
                session.history = []
                out.print("[dim]conversation cleared[/]")
            elif command == "/domain":
                try:
                    if arg.strip():
                        session.set_domain(arg.strip())
                    out.print(f"[dim]memory: {session.domain} (available: {', '.join(session.available())}, auto)[/]")
                except BankError as exc:
                    out.print(str(exc), style="red", markup=False, highlight=False)
            elif command.startswith("/"):
                out.print(f"unknown command {command}; /help lists them", style="red", markup=False, highlight=False)
            else:
                try:
                    _answer(session, text, max_new_tokens)
                except KeyboardInterrupt:  # Ctrl-C before the answer began (routing, switching memory)
                    out.print("\n[yellow]stopped[/]")
    finally:
        history()


def _answer(session, text: str, max_new_tokens: int) -> None:
    out.print("[bold green]assistant>[/] ", end="")
    turn = session.ask(text, on_token=lambda t: out.print(t, end="", markup=False, highlight=False), max_new_tokens=max_new_tokens)
    if turn.interrupted:
        out.print("\n[yellow]stopped[/]", end="")
    where = f"{turn.memory} (routed, {turn.route.scores.get(turn.memory, 0):.2f})" if turn.route else turn.memory
    out.print(f"\n[dim]memory: {where}  engine: {session.engine}  first token {turn.first_token_s:.2f} s  {turn.tokens / max(turn.seconds, 1e-9):.1f} tokens/s[/]")


def _line_editing(history_file: Path):
    """Turn on readline line editing for input() with a persistent history; returns the function that saves it."""
    try:
        import readline
    except ImportError:  # not on every platform (Windows)
        return lambda: None
    try:
        readline.read_history_file(history_file)
    except OSError:
        pass

    def save() -> None:
        try:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            readline.set_history_length(1000)
            readline.write_history_file(history_file)
        except OSError:
            pass

    return save
