#!/usr/bin/env python3
"""Runs a command under a pseudo-terminal and keeps what its screen shows in a file.

usage: pty_screen.py SCREEN_FILE COLS ROWS LIMIT_S -- CMD [ARGS...]

The output goes through a terminal emulator (pyte), so the file holds the screen as a person
sees it (full-screen programs redraw only the cells that change). The file is rewritten
(atomically) whenever the screen changes. Lines on standard input are keys to type: each
line's text is written to the terminal as is ("q" quits `epoxi top`). When the command exits,
the last screen is written and one JSON line {"exit": CODE} printed. After LIMIT_S seconds,
or when standard input closes, the command is killed (exit code 3 then).
"""
import fcntl, json, os, pty, select, signal, struct, sys, termios, time

import pyte

screen_file, cols, rows, limit_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
assert sys.argv[5] == "--"
cmd = sys.argv[6:]

pid, fd = pty.fork()
if pid == 0:
    os.environ["TERM"] = "xterm-256color"
    os.execvp(cmd[0], cmd)
fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
os.kill(pid, signal.SIGWINCH)

screen = pyte.Screen(cols, rows)
stream = pyte.ByteStream(screen)


def dump():
    tmp = screen_file + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(screen.display) + "\n")
    os.replace(tmp, screen_file)


def finish(code):
    dump()
    print(json.dumps({"exit": code}), flush=True)
    sys.exit(0 if code is not None else 3)


deadline = time.monotonic() + limit_s
stdin_open = True
while True:
    if time.monotonic() > deadline:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        finish(None)
    fds = [fd] + ([sys.stdin.fileno()] if stdin_open else [])
    ready, _, _ = select.select(fds, [], [], 0.1)
    if fd in ready:
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        if data:
            stream.feed(data)
            dump()
        else:
            _, status = os.waitpid(pid, 0)
            finish(os.waitstatus_to_exitcode(status))
    if sys.stdin.fileno() in ready:
        line = sys.stdin.readline()
        if not line:
            stdin_open = False
        else:
            os.write(fd, line.rstrip("\n").encode())
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        # Drain what is left, then report.
        try:
            while select.select([fd], [], [], 0.05)[0]:
                data = os.read(fd, 65536)
                if not data:
                    break
                stream.feed(data)
        except OSError:
            pass
        finish(os.waitstatus_to_exitcode(status))
