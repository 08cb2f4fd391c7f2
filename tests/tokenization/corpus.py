"""A deterministic, varied text corpus for tokenizer parity tests: many scripts, code, emoji, CJK, runs of spaces
and newlines, control characters and very long words."""

from __future__ import annotations

import random

SCRIPTS = {
    "latin": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "accents": "àâäéèêëïîôöùûüÿçœæßñáíóúãõåøłśźżčřšžğış",
    "cyrillic": "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩЭЮЯ",
    "greek": "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩάέήίόύώ",
    "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "hebrew": "אבגדהוזחטיכלמנסעפצקרשת",
    "devanagari": "अआइईउऊएऐओऔकखगघचछजझटठडढणतथदधनपफबभमयरलवशषसह्ािीुूेैोौं",
    "thai": "กขคงจฉชซญดตถทธนบปผพฟภมยรลวศษสหอฮะาิีึืุูเแโใไ่้๊๋",
    "cjk": "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞观争究包组造落视济喜离虽坏兴切",
    "kana": "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをんアイウエオカキクケコサシスセソタチツテトナニヌネノ",
    "hangul": "가나다라마바사아자차카타파하각난닫랄맘밥삿앙잦찾캌탙팦핳한국어조선말",
    "emoji": ["😀", "😂", "🥲", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇫🇷", "🇯🇵", "🤖", "🧑🏿‍🚀", "✨", "🔥", "🦀", "🐍"],
    "symbols": "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~¡¿«»“”‘’„…–—•°±×÷€£¥©®™§¶",
    "digits": "0123456789٠١٢٣٤٥٦٧٨٩०१२३४५६७८९",
    "combining": ["e\u0301", "a\u0308", "n\u0303", "o\u0302\u0323", "\u0915\u094d\u0937"],
}
CONTROLS = [chr(c) for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F, 0x85, 0xA0, 0x200B, 0x2028,
                             0xFEFF)]
CODE = [
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "fn main() {\n\tprintln!(\"{}\", 42);\n}",
    "<div class=\"box\">&nbsp;<span>x &lt; y</span></div>",
    "const re = /^[a-z0-9_-]{3,16}$/i;\nconsole.log(re.test('abc'));",
    "    if err != nil {\n        return fmt.Errorf(\"wrap: %w\", err)\n    }",
    "$ git log --oneline | head -n 5 && echo \"done\" >> /tmp/out.txt",
    "{\"key\": [1, 2.5, -3e10, true, null], \"nested\": {\"a\": \"b\"}}",
    "x = [i for i in range(10) if i % 2 == 0]\r\nprint(x)\r\n",
]


def _word(rng: random.Random, alphabet) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))


def make_corpus(n_lines: int = 5000, seed: int = 0) -> list[str]:
    """`n_lines` lines of mixed text, the same for a given seed."""
    rng = random.Random(seed)
    names = list(SCRIPTS)
    lines = []
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.08:
            lines.append(rng.choice(CODE))
            continue
        if kind < 0.11:  # a very long word
            lines.append(_word(rng, SCRIPTS[rng.choice(["latin", "cyrillic", "cjk"])]) * rng.randint(20, 60))
            continue
        parts = []
        for _ in range(rng.randint(1, 25)):
            r = rng.random()
            if r < 0.55:
                parts.append(_word(rng, SCRIPTS[rng.choice(names)]))
            elif r < 0.7:
                parts.append(" " * rng.randint(2, 9))
            elif r < 0.78:
                parts.append(rng.choice(["\n", "\n\n", "\n\n\n", "\t", " \n ", "\r\n", "\t\t  \n"]))
            elif r < 0.85:
                parts.append(rng.choice(CONTROLS))
            elif r < 0.92:
                parts.append("".join(rng.choice(SCRIPTS["emoji"]) for _ in range(rng.randint(1, 4))))
            else:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 12))))
            parts.append(rng.choice([" ", " ", " ", "", ", ", ". "]))
        line = "".join(parts)
        if rng.random() < 0.2:
            line = " " + line  # leading spaces matter to SentencePiece-style tokenizers
        lines.append(line)
    return lines
