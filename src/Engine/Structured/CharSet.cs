namespace LocalVllm.Engine.Structured;

/// <summary>
/// A set of Unicode code points as sorted, disjoint ranges, and its encodings as byte expressions: plain UTF-8 (a
/// regex over the raw output) or the characters of a JSON string (where <c>"</c>, <c>\</c> and control characters
/// appear escaped). Surrogates are never members.
/// </summary>
internal sealed class CharSet
{
    public const int MaxCodePoint = 0x10FFFF;
    private readonly (int Lo, int Hi)[] _ranges;

    private CharSet((int Lo, int Hi)[] ranges) => _ranges = ranges;

    public IReadOnlyList<(int Lo, int Hi)> Ranges => _ranges;

    public static readonly CharSet None = new([]);
    public static readonly CharSet Any = Of((0, MaxCodePoint));
    public static readonly CharSet Digit = Of(('0', '9'));
    public static readonly CharSet Word = Of(('0', '9'), ('A', 'Z'), ('_', '_'), ('a', 'z'));
    public static readonly CharSet Space = Of(('\t', '\r'), (' ', ' '), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
        (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF));
    /// <summary>ECMAScript's <c>.</c>: anything but line terminators.</summary>
    public static readonly CharSet Dot = Of(('\n', '\n'), ('\r', '\r'), (0x2028, 0x2029)).Negate();

    public static CharSet Of(params (int Lo, int Hi)[] ranges) => Normalise(ranges);
    public static CharSet Single(int cp) => Of((cp, cp));

    public bool IsEmpty => _ranges.Length == 0;

    public CharSet Union(CharSet other) => Normalise([.. _ranges, .. other._ranges]);

    public CharSet Negate()
    {
        var result = new List<(int, int)>();
        int next = 0;
        foreach (var (lo, hi) in _ranges)
        {
            if (lo > next) result.Add((next, lo - 1));
            next = hi + 1;
        }
        if (next <= MaxCodePoint) result.Add((next, MaxCodePoint));
        return Normalise(result);
    }

    public CharSet Minus(CharSet other) => Negate().Union(other).Negate();

    private static CharSet Normalise(IEnumerable<(int Lo, int Hi)> ranges)
    {
        var list = new List<(int Lo, int Hi)>();
        foreach (var (lo, hi) in ranges.Where(r => r.Lo <= r.Hi).OrderBy(r => r.Lo))
        {
            if (list.Count > 0 && lo <= list[^1].Hi + 1) list[^1] = (list[^1].Lo, Math.Max(list[^1].Hi, hi));
            else list.Add((lo, hi));
        }
        // Surrogates are not characters.
        var clean = new List<(int, int)>();
        foreach (var (lo, hi) in list)
        {
            if (hi < 0xD800 || lo > 0xDFFF) { clean.Add((lo, hi)); continue; }
            if (lo < 0xD800) clean.Add((lo, 0xD7FF));
            if (hi > 0xDFFF) clean.Add((0xE000, hi));
        }
        return new CharSet(clean.ToArray());
    }

    /// <summary>One character of this set, as its UTF-8 bytes.</summary>
    public Rx Utf8() => Rx.Alt(_ranges.SelectMany(r => Utf8Ranges(r.Lo, r.Hi)).ToArray());

    private static readonly CharSet JsonPlain = Of((0x20, MaxCodePoint)).Minus(Of(('"', '"'), ('\\', '\\')));

    /// <summary>
    /// One character of this set as it appears inside a JSON string: plain UTF-8 where JSON allows it, else the
    /// escape <c>json.dumps</c> writes (<c>\"</c>, <c>\\</c>, <c>\n</c>, ..., <c>\u001f</c>); <c>\/</c> and
    /// <c>\uXXXX</c> forms of other characters are accepted only by the unconstrained string (see <see cref="JsonAnyChar"/>).
    /// </summary>
    public Rx JsonChar()
    {
        var plain = Intersect(JsonPlain);
        var parts = new List<Rx> { plain.Utf8() };
        foreach (var (lo, hi) in _ranges)
            for (int cp = lo; cp <= Math.Min(hi, 0x5C); cp++)
            {
                if (cp >= 0x20 && cp != '"' && cp != '\\') continue;
                parts.Add(Rx.Literal(cp switch
                {
                    '"' => "\\\"",
                    '\\' => "\\\\",
                    '\n' => "\\n",
                    '\r' => "\\r",
                    '\t' => "\\t",
                    '\b' => "\\b",
                    '\f' => "\\f",
                    _ => $"\\u{cp:x4}",
                }));
            }
        return Rx.Alt(parts.ToArray());
    }

    public CharSet Intersect(CharSet other) => Negate().Union(other.Negate()).Negate();

    /// <summary>Any one character of a JSON string, escapes included.</summary>
    public static Rx JsonAnyChar()
    {
        var hex = Rx.Ranges([((byte)'0', (byte)'9'), ((byte)'A', (byte)'F'), ((byte)'a', (byte)'f')]);
        var escape = Rx.Seq(Rx.Byte((byte)'\\'), Rx.Alt(
            Rx.Ranges([((byte)'"', (byte)'"'), ((byte)'/', (byte)'/'), ((byte)'\\', (byte)'\\'), ((byte)'b', (byte)'b'),
                ((byte)'f', (byte)'f'), ((byte)'n', (byte)'n'), ((byte)'r', (byte)'r'), ((byte)'t', (byte)'t')]),
            Rx.Seq(Rx.Byte((byte)'u'), hex, hex, hex, hex)));
        return Rx.Alt(JsonPlain.Utf8(), escape);
    }

    /// <summary>UTF-8 byte sequences for the code points [lo, hi] (no surrogates inside).</summary>
    private static IEnumerable<Rx> Utf8Ranges(int lo, int hi)
    {
        int[] limits = [0x7F, 0x7FF, 0xFFFF, MaxCodePoint];
        int start = lo;
        foreach (int limit in limits)
        {
            if (start > hi) yield break;
            if (start > limit) continue;
            int end = Math.Min(hi, limit);
            foreach (var rx in SplitSameLength(start, end)) yield return rx;
            start = end + 1;
        }
    }

    private static IEnumerable<Rx> SplitSameLength(int lo, int hi)
    {
        int n = Length(lo);
        for (int i = 1; i < n; i++)
        {
            int m = (1 << (6 * i)) - 1;
            if ((lo & ~m) != (hi & ~m))
            {
                if ((lo & m) != 0)
                    return SplitSameLength(lo, lo | m).Concat(SplitSameLength((lo | m) + 1, hi));
                if ((hi & m) != m)
                    return SplitSameLength(lo, (hi & ~m) - 1).Concat(SplitSameLength(hi & ~m, hi));
            }
        }
        var a = Encode(lo);
        var b = Encode(hi);
        return [Rx.Seq(a.Select((x, k) => Rx.Range(x, b[k])).ToArray())];
    }

    private static int Length(int cp) => cp <= 0x7F ? 1 : cp <= 0x7FF ? 2 : cp <= 0xFFFF ? 3 : 4;

    private static byte[] Encode(int cp) => Length(cp) switch
    {
        1 => [(byte)cp],
        2 => [(byte)(0xC0 | (cp >> 6)), (byte)(0x80 | (cp & 0x3F))],
        3 => [(byte)(0xE0 | (cp >> 12)), (byte)(0x80 | ((cp >> 6) & 0x3F)), (byte)(0x80 | (cp & 0x3F))],
        _ => [(byte)(0xF0 | (cp >> 18)), (byte)(0x80 | ((cp >> 12) & 0x3F)), (byte)(0x80 | ((cp >> 6) & 0x3F)), (byte)(0x80 | (cp & 0x3F))],
    };
}
