"""Generated test strings for tokenizer parity (seeded, so every run checks the same strings)."""

from __future__ import annotations

import random

PIECES = [
    # multilingual text
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "naïve café", "日本語のテキスト", "中文字符测试",
    "한국어 문장", "Привет, мир", "مرحبا بالعالم", "नमस्ते दुनिया", "Γειά σου", "שלום", "สวัสดีครับ", "Tiếng Việt có dấu",
    "ﷺ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "e\u0301\u0302", "ÀÉÎÕÜ", "straße STRASSE",
    # emoji (multi-codepoint and flags)
    "🎉🚀✨👩‍👩‍👧‍👦", "🇫🇷🇯🇵", "👍🏽", "🫠",
    # code
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { a[i] += 1; }", "SELECT * FROM t WHERE id=3;",
    "#include <stdio.h>\nint main(void) {\n\treturn 0;\n}\n", "const x = `${a}`; // comment", "<div class=\"a\">b</div>",
    '{"key": [1, 2.5, null, true]}',
    # special-token text (must stay text)
    "<|eot|>", "<|begin_of_text|>", "<|header_start|>user<|header_end|>", "<|python_start|>", "<|fake_token|>",
    "<|reserved_special_token_5|>", "<|eom|>\n\n", "<|image|><|patch|>",
    # whitespace, numbers, contractions, misc
    "   ", "\n\n\n", "\t\t", " \r\n ", "\u00a0\u2003", "1234567890", "3.14159e-10", "I'm You're It's", "DON'T SHOUT",
    "https://example.com/a?b=c&d=e", "email@example.org", "$€£¥", "\u200b\u200d", "a" * 50, "ab " * 30, "--==**",
]


def generated_strings(n: int = 1000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, 6)
        parts = [rng.choice(PIECES) for _ in range(k)]
        if rng.random() < 0.2:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice([" ", "\n", "\t", " \n"]) * rng.randint(1, 40))
        if rng.random() < 0.1:
            parts.append("".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(1, 30))))
        if rng.random() < 0.05:
            parts.append("".join(chr(rng.choice([rng.randint(0x4E00, 0x9FFF), rng.randint(0x1F300, 0x1FAFF)]))
                                 for _ in range(rng.randint(1, 20))))
        out.append(rng.choice(["", " ", "\n"]).join(parts))
    # runs past Meta's 25,000-character cut (whitespace and non-whitespace)
    out.append(" " * 30000 + "end")
    out.append("a b\n" + "\n \t" * 9000 + "tail")
    out.append("x" * 26000 + " y")
    return out


def long_string(seed: int = 1) -> str:
    """Over 400,000 characters (Meta encodes such input in 400k-character slices)."""
    rng = random.Random(seed)
    words = ["hello", " world", "日本語", " مرحبا", "  ", "\n", "🎉", "def f(x):", "<|eot|>"]
    return "".join(rng.choice(words) for _ in range(80000)) + " " * 26000 + "z" * 26000
