"""Generated test strings for tokenizer parity."""

from __future__ import annotations

import random

PIECES = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "naïve café", "日本語のテキスト", "中文字符测试",
    "한국어 문장", "Привет, мир", "مرحبا بالعالم", "नमस्ते दुनिया", "Γειά σου", "שלום", "🎉🚀✨👩‍👩‍👧‍👦", "🇫🇷🇯🇵",
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { a[i] += 1; }", "SELECT * FROM t WHERE id=3;",
    "<|eot|>", "<|begin_of_text|>", "<|header_start|>user<|header_end|>", "<|python_start|>", "<|fake_token|>",
    "   ", "\n\n\n", "\t\t", " \r\n ", "1234567890", "3.14159e-10", "I'm You're It's", "DON'T SHOUT",
    "https://example.com/a?b=c&d=e", "email@example.org", "$€£¥", "\u200b\u200d", "a" * 50, "ab " * 30,
]


def generated_strings(n: int = 1000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, 6)
        parts = [rng.choice(PIECES) for _ in range(k)]
        if rng.random() < 0.2:
            parts.insert(rng.randrange(len(parts) + 1), " " * rng.randint(1, 40))
        if rng.random() < 0.1:
            parts.append("".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(1, 30))))
        out.append(rng.choice(["", " ", "\n"]).join(parts))
    out.append(" " * 30000 + "end")  # a whitespace run longer than Meta's 25,000-character cut
    out.append("x" * 26000 + " y")
    return out
