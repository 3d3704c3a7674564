using System.Globalization;

namespace LocalVllm.Engine.Structured;

/// <summary>
/// Parses a regular expression (the ECMAScript dialect JSON Schema's <c>pattern</c> uses, which Python's <c>re</c>
/// shares for these constructs) into a byte expression. Characters become bytes through a chosen encoding: plain UTF-8
/// for a regex over the output, or the characters of a JSON string for a schema's <c>pattern</c>. Supported: literals,
/// <c>.</c>, classes with ranges and negation, <c>\d \w \s</c> and their negations, escapes (<c>\n</c>, <c>\xHH</c>,
/// <c>\uHHHH</c>, <c>\u{H..}</c>), groups (capturing, non-capturing, named), alternation, <c>* + ? {n} {n,} {n,m}</c>
/// (lazy forms match the same strings), and <c>^</c> / <c>$</c> at the ends of top-level alternatives. Lookaround,
/// backreferences, word boundaries and Unicode property classes are refused with a <see cref="GrammarException"/>,
/// since an automaton cannot honour them.
/// </summary>
internal sealed class RegexSyntax
{
    private const int MaxRepeat = 10_000;
    private readonly string _p;
    private readonly Func<CharSet, Rx> _encode;
    private int _i;

    private RegexSyntax(string pattern, Func<CharSet, Rx> encode)
    {
        _p = pattern;
        _encode = encode;
    }

    /// <summary>
    /// The strings matched by <paramref name="pattern"/>. <paramref name="search"/>: JSON Schema's semantics, where the
    /// pattern may match anywhere unless anchored with <c>^</c> and <c>$</c>; otherwise the whole string must match.
    /// </summary>
    public static Rx Parse(string pattern, Func<CharSet, Rx> encode, bool search)
    {
        var p = new RegexSyntax(pattern, encode);
        try
        {
            // Alternatives grouped by their anchors, so that a search for "a|b|c" is one ".*(a|b|c).*" (an automaton
            // the size of the words) rather than a union of ".*a.*" terms (which tracks every word after a match).
            var groups = new List<Rx>[4];
            for (int g = 0; g < 4; g++) groups[g] = [];
            while (true)
            {
                bool startAnchor = p.Eat('^');
                var (body, endAnchor) = p.ParseSequence(topLevel: true);
                groups[(startAnchor || !search ? 1 : 0) + (endAnchor || !search ? 2 : 0)].Add(body);
                if (!p.Eat('|')) break;
            }
            if (p._i < pattern.Length) throw p.Error($"unexpected '{pattern[p._i]}'");
            var anyChars = Rx.Star(encode(CharSet.Any));
            var parts = new List<Rx>();
            for (int g = 0; g < 4; g++)
            {
                if (groups[g].Count == 0) continue;
                var body = Rx.Alt(groups[g].ToArray());
                if ((g & 1) == 0) body = Rx.Seq(anyChars, body);
                if ((g & 2) == 0) body = Rx.Seq(body, anyChars);
                parts.Add(body);
            }
            return Rx.Alt(parts.ToArray());
        }
        catch (GrammarException) { throw; }
        catch (Exception e) when (e is FormatException or OverflowException or ArgumentException)
        {
            throw new GrammarException($"the regular expression /{pattern}/ does not compile: {e.Message}");
        }
    }

    private GrammarException Error(string what) => new($"the regular expression /{_p}/ does not compile: {what} at position {_i}");

    private bool More => _i < _p.Length;
    private char Peek => _p[_i];

    private bool Eat(char c)
    {
        if (More && _p[_i] == c) { _i++; return true; }
        return false;
    }

    private Rx ParseAlternation()
    {
        var alts = new List<Rx>();
        do
        {
            var (seq, _) = ParseSequence(topLevel: false);
            alts.Add(seq);
        } while (Eat('|'));
        return Rx.Alt(alts.ToArray());
    }

    private (Rx Body, bool EndAnchor) ParseSequence(bool topLevel)
    {
        var items = new List<Rx>();
        while (More && Peek != '|' && Peek != ')')
        {
            if (Peek == '$')
            {
                _i++;
                if (topLevel && (!More || Peek == '|')) return (Rx.Seq(items.ToArray()), true);
                throw Error("'$' before the end of the pattern is not supported");
            }
            if (Peek == '^') throw Error("'^' after the start of the pattern is not supported");
            var atom = ParseAtom();
            items.Add(ParseQuantifier(atom));
        }
        return (Rx.Seq(items.ToArray()), false);
    }

    private Rx ParseQuantifier(Rx atom)
    {
        while (More)
        {
            int min, max;
            char c = Peek;
            if (c == '*') { min = 0; max = -1; _i++; }
            else if (c == '+') { min = 1; max = -1; _i++; }
            else if (c == '?') { min = 0; max = 1; _i++; }
            else if (c == '{' && TryBraces(out min, out max)) { }
            else break;
            if (Eat('?')) { } // lazy: same language
            else if (More && Peek == '+') throw Error("possessive quantifiers are not supported");
            if (max >= 0 && max < min) throw Error($"quantifier {{{min},{max}}} has max below min");
            if (min > MaxRepeat || max > MaxRepeat) throw Error($"a repetition above {MaxRepeat} is not supported");
            atom = Rx.Repeat(atom, min, max);
        }
        return atom;
    }

    private bool TryBraces(out int min, out int max)
    {
        min = max = 0;
        int j = _i + 1;
        int Num()
        {
            int start = j;
            while (j < _p.Length && char.IsAsciiDigit(_p[j])) j++;
            return j == start ? -2 : int.Parse(_p.AsSpan(start, j - start), CultureInfo.InvariantCulture);
        }
        int a = Num();
        if (a == -2) return false; // a literal '{'
        int b = a;
        if (j < _p.Length && _p[j] == ',')
        {
            j++;
            b = Num();
            if (b == -2) b = -1;
        }
        if (j >= _p.Length || _p[j] != '}') return false;
        _i = j + 1;
        min = a;
        max = b;
        return true;
    }

    private Rx ParseAtom()
    {
        char c = _p[_i++];
        switch (c)
        {
            case '(':
            {
                if (Eat('?'))
                {
                    if (Eat(':')) { }
                    else if (Eat('<') || (Eat('P') && Eat('<')))
                    {
                        if (More && (Peek == '=' || Peek == '!')) throw Error("lookbehind is not supported");
                        while (More && Peek != '>') _i++;
                        if (!Eat('>')) throw Error("unterminated group name");
                    }
                    else if (More && (Peek == '=' || Peek == '!')) throw Error("lookahead is not supported");
                    else throw Error("unsupported group syntax");
                }
                var inner = ParseAlternation();
                if (!Eat(')')) throw Error("missing ')'");
                return inner;
            }
            case '[': return _encode(ParseClass());
            case '.': return _encode(CharSet.Dot);
            case '\\': return ParseEscape(inClass: false) is { } set ? _encode(set) : throw Error("bad escape");
            case '*' or '+' or '?': throw Error($"nothing to repeat before '{c}'");
            case ')': throw Error("unbalanced ')'");
            default:
                if (char.IsHighSurrogate(c) && More && char.IsLowSurrogate(Peek))
                    return _encode(CharSet.Single(char.ConvertToUtf32(c, _p[_i++])));
                return _encode(CharSet.Single(c));
        }
    }

    private CharSet ParseClass()
    {
        bool negate = Eat('^');
        var set = CharSet.None;
        bool first = true;
        while (true)
        {
            if (!More) throw Error("missing ']'");
            char c = Peek;
            if (c == ']' && !first) { _i++; break; }
            first = false;
            var lo = ClassAtom();
            if (More && Peek == '-' && _i + 1 < _p.Length && _p[_i + 1] != ']')
            {
                _i++;
                var hi = ClassAtom();
                if (lo.Ranges.Count != 1 || lo.Ranges[0].Lo != lo.Ranges[0].Hi || hi.Ranges.Count != 1 || hi.Ranges[0].Lo != hi.Ranges[0].Hi)
                    throw Error("a class range needs single characters at both ends");
                int a = lo.Ranges[0].Lo, b = hi.Ranges[0].Lo;
                if (b < a) throw Error("class range out of order");
                set = set.Union(CharSet.Of((a, b)));
            }
            else set = set.Union(lo);
        }
        return negate ? set.Negate() : set;
    }

    private CharSet ClassAtom()
    {
        char c = _p[_i++];
        if (c == '\\') return ParseEscape(inClass: true) ?? throw Error("bad escape");
        if (c == '[' && More && Peek == ':') throw Error("POSIX classes are not supported");
        if (char.IsHighSurrogate(c) && More && char.IsLowSurrogate(Peek)) return CharSet.Single(char.ConvertToUtf32(c, _p[_i++]));
        return CharSet.Single(c);
    }

    private CharSet? ParseEscape(bool inClass)
    {
        if (!More) throw Error("pattern ends with '\\'");
        char c = _p[_i++];
        switch (c)
        {
            case 'd': return CharSet.Digit;
            case 'D': return CharSet.Digit.Negate();
            case 'w': return CharSet.Word;
            case 'W': return CharSet.Word.Negate();
            case 's': return CharSet.Space;
            case 'S': return CharSet.Space.Negate();
            case 'n': return CharSet.Single('\n');
            case 'r': return CharSet.Single('\r');
            case 't': return CharSet.Single('\t');
            case 'f': return CharSet.Single('\f');
            case 'v': return CharSet.Single('\v');
            case '0': return CharSet.Single(0);
            case 'b' when inClass: return CharSet.Single('\b');
            case 'b' or 'B': throw Error("word boundaries are not supported");
            case 'x': return CharSet.Single(Hex(2));
            case 'u':
                if (Eat('{'))
                {
                    int start = _i;
                    while (More && Peek != '}') _i++;
                    int cp = int.Parse(_p.AsSpan(start, _i - start), NumberStyles.HexNumber, CultureInfo.InvariantCulture);
                    if (!Eat('}')) throw Error("missing '}'");
                    return CharSet.Single(cp);
                }
                return CharSet.Single(Hex(4));
            case 'p' or 'P': throw Error("Unicode property classes are not supported");
            case 'A' or 'Z' or 'z' or 'G': throw Error($"the anchor \\{c} is not supported");
            default:
                if (char.IsAsciiDigit(c)) throw Error("backreferences are not supported");
                if (char.IsAsciiLetter(c)) throw Error($"unknown escape \\{c}");
                return CharSet.Single(c);
        }
    }

    private int Hex(int digits)
    {
        if (_i + digits > _p.Length) throw Error("short hexadecimal escape");
        int v = int.Parse(_p.AsSpan(_i, digits), NumberStyles.HexNumber, CultureInfo.InvariantCulture);
        _i += digits;
        return v;
    }
}
