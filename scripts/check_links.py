#!/usr/bin/env python3
"""Checks that every relative Markdown link in the project's documentation resolves.

Usage: check_links.py [FILE.md ...]   (default: README.md, CONTRIBUTING.md, deploy/README.md,
examples/README.md and docs/*.md, relative to the repository root)

A link `[text](path)` or `[text](path#fragment)` (or a reference definition `[name]: path`) must
name a file or directory that exists, relative to the Markdown file that holds it; a fragment
must be the anchor of a heading in the target file (or in the same file for `(#fragment)`), as
GitHub renders it: the heading's text without markup, lowercased, spaces turned into '-', every
other character but letters, digits, '-' and '_' dropped, and '-1', '-2'... appended to repeats.
Links inside fenced code blocks and inline code are not links. External links (a scheme such as
https: or mailto:) are not checked. Every broken link is printed as FILE:LINE and the script exits
1 if there is any.
"""

import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = ["README.md", "CONTRIBUTING.md", "deploy/README.md", "examples/README.md", "docs/*.md"]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
# [text](target) with text possibly spanning lines and holding `code` or nested [brackets];
# the target is up to the first space or ')' (titles are not used here).
INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def blank_code(text):
    """The text with fenced blocks and inline code replaced by spaces (newlines kept), so that
    offsets and line numbers stay those of the file."""
    out, in_fence, marker = [], False, None
    for line in text.splitlines(keepends=True):
        match = FENCE.match(line)
        if match and (not in_fence or match.group(1) == marker):
            in_fence, marker = (not in_fence), match.group(1)
            out.append(re.sub(r"[^\n]", " ", line))
        elif in_fence:
            out.append(re.sub(r"[^\n]", " ", line))
        else:
            out.append(line)
    text = "".join(out)
    return INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def slug(heading):
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "").replace("~~", "")
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)  # _emphasis_, not snake_case
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path, cache={}):
    """Every heading anchor of a Markdown file (and explicit <a id/name> anchors)."""
    if path not in cache:
        seen, found = {}, set()
        in_fence, marker = False, None
        with open(path, encoding="utf-8") as file:
            for line in file:
                match = FENCE.match(line)
                if match and (not in_fence or match.group(1) == marker):
                    in_fence, marker = (not in_fence), match.group(1)
                    continue
                if in_fence:
                    continue
                for explicit in re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line):
                    found.add(explicit)
                heading = HEADING.match(line)
                if not heading:
                    continue
                base = slug(heading.group(2))
                count = seen.get(base, 0)
                seen[base] = count + 1
                found.add(base if count == 0 else f"{base}-{count}")
        cache[path] = found
    return cache[path]


def check(md):
    """The broken links of one Markdown file, as (line, target, reason)."""
    text = open(md, encoding="utf-8").read()
    visible = blank_code(text)
    targets = [(m.start(1), m.group(1)) for m in INLINE_LINK.finditer(visible)]
    targets += [(m.start(1), m.group(1)) for m in REFERENCE_DEF.finditer(visible)]
    broken = []
    for offset, target in sorted(targets):
        if SCHEME.match(target) or target.startswith("//"):
            continue
        line = visible.count("\n", 0, offset) + 1
        path, _, fragment = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(md), path)) if path else md
        if not os.path.exists(resolved):
            broken.append((line, target, f"{os.path.relpath(resolved)} does not exist"))
            continue
        if not fragment:
            continue
        if os.path.isdir(resolved) or not resolved.endswith(".md"):
            broken.append((line, target, f"#{fragment} on {os.path.relpath(resolved)}, "
                                         "which is not a Markdown file"))
        elif fragment not in anchors(resolved):
            broken.append((line, target, f"no heading with anchor #{fragment} in "
                                         f"{os.path.relpath(resolved)}"))
    return broken


def main(args):
    patterns = args or [os.path.join(ROOT, p) for p in DEFAULT]
    files = sorted({f for p in patterns for f in (glob.glob(p) or [p])})
    failures = 0
    for md in files:
        if not os.path.exists(md):
            print(f"{md}: no such file", file=sys.stderr)
            failures += 1
            continue
        for line, target, reason in check(md):
            print(f"{os.path.relpath(md)}:{line}: broken link ({target}): {reason}", file=sys.stderr)
            failures += 1
    if failures:
        sys.exit(f"links: {failures} broken in {len(files)} files")
    print(f"links: OK ({len(files)} files)")


if __name__ == "__main__":
    main(sys.argv[1:])
