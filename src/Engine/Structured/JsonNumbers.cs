using System.Numerics;

namespace LocalVllm.Engine.Structured;

/// <summary>
/// JSON numbers as byte expressions: any number, any integer, and both within integer-valued bounds (inclusive or
/// exclusive). A bounded number is written without an exponent (the bounds are checked on its digits: the integer
/// part's range, and whether the fraction is zero where a bound is met exactly).
/// </summary>
internal static class JsonNumbers
{
    private static Rx D => Rx.Range((byte)'0', (byte)'9');
    private static Rx D19 => Rx.Range((byte)'1', (byte)'9');
    private static Rx Minus => Rx.Byte((byte)'-');
    private static Rx Fraction => Rx.Seq(Rx.Byte((byte)'.'), Rx.Plus(D));
    private static Rx Exponent => Rx.Seq(Rx.Ranges([((byte)'e', (byte)'e'), ((byte)'E', (byte)'E')]), Rx.Optional(Rx.Ranges([((byte)'+', (byte)'+'), ((byte)'-', (byte)'-')])), Rx.Plus(D));
    private static Rx Natural => Rx.Alt(Rx.Byte((byte)'0'), Rx.Seq(D19, Rx.Star(D)));

    public static Rx AnyInteger => Rx.Seq(Rx.Optional(Minus), Natural);
    public static Rx AnyNumber => Rx.Seq(Rx.Optional(Minus), Natural, Rx.Optional(Fraction), Rx.Optional(Exponent));

    /// <summary>
    /// Numbers x with lo &lt; x (or &lt;=) and x &lt; hi (or &lt;=); null bounds are open. <paramref name="integer"/>: no
    /// fraction. Returns <see cref="Rx.Nothing"/> when no number qualifies.
    /// </summary>
    public static Rx Bounded(BigInteger? lo, bool loExclusive, BigInteger? hi, bool hiExclusive, bool integer)
    {
        if (lo is null && hi is null) return integer ? AnyInteger : AnyNumber;
        if (integer)
        {
            // Integers: tighten exclusive bounds, then split by sign.
            BigInteger? a = lo is { } l ? (loExclusive ? l + 1 : l) : null;
            BigInteger? b = hi is { } h ? (hiExclusive ? h - 1 : h) : null;
            if (a is { } aa && b is { } bb && aa > bb) return Rx.Nothing;
            var parts = new List<Rx>();
            // Non-negative part: [max(a,0), b]
            if (b is not { } b0 || b0 >= 0)
                parts.Add(Digits(BigInteger.Max(a ?? 0, 0), b));
            // Negative part: -m with m in [max(1, -b), -a]
            if (a is not { } a0 || a0 < 0)
                parts.Add(Rx.Seq(Minus, Digits(BigInteger.Max(b is { } bn ? -bn : 1, 1), a is { } an ? -an : null)));
            return Rx.Alt(parts.ToArray());
        }
        var result = new List<Rx>();
        // x >= 0, written as I.F: magnitude range [lo', hi'] with lo' = max(lo, 0).
        if (hi is not { } h0 || h0 > 0 || (h0 == 0 && !hiExclusive))
        {
            bool aEx = lo is { } l0 && l0 >= 0 && loExclusive;
            BigInteger aMag = lo is { } l1 && l1 > 0 ? l1 : 0;
            result.Add(Magnitude(aMag, aEx, hi, hiExclusive));
        }
        // x < 0: magnitude m = -x in (0, ...]: bounds -hi .. -lo.
        if (lo is not { } l2 || l2 < 0)
        {
            BigInteger mLo = hi is { } h1 && h1 < 0 ? -h1 : 0;
            bool mLoEx = hi is { } h2 && h2 < 0 ? hiExclusive : true; // m > 0 when the bound is not negative
            BigInteger? mHi = lo is { } l3 ? -l3 : null;
            result.Add(Rx.Seq(Minus, Magnitude(mLo, mLoEx, mHi, loExclusive)));
        }
        return Rx.Alt(result.ToArray());
    }

    /// <summary>Decimal magnitudes I or I.F (no exponent) with a &lt;(=) m &lt;(=) b, a &gt;= 0.</summary>
    private static Rx Magnitude(BigInteger a, bool aEx, BigInteger? b, bool bEx)
    {
        var zeroFrac = Rx.Optional(Rx.Seq(Rx.Byte((byte)'.'), Rx.Plus(Rx.Byte((byte)'0'))));
        var anyFrac = Rx.Optional(Fraction);
        var nonZeroFrac = Rx.Seq(Rx.Byte((byte)'.'), Rx.Star(D), D19, Rx.Star(D));
        var parts = new List<Rx>();
        if (b is { } bb && (a > bb || (a == bb && (aEx || bEx)))) return Rx.Nothing;
        // Integer parts strictly inside: any fraction. I in [a (+1 if exclusive), b-1].
        BigInteger first = aEx ? a + 1 : a;
        BigInteger? last = b is { } b1 ? b1 - 1 : null;
        if (last is not { } l || first <= l)
            parts.Add(Rx.Seq(Digits(first, last), anyFrac));
        if (aEx && (b is not { } b2 || a < b2)) parts.Add(Rx.Seq(Digits(a, a), nonZeroFrac)); // just above a
        if (b is { } b3 && !bEx) parts.Add(Rx.Seq(Digits(b3, b3), zeroFrac)); // exactly b
        return Rx.Alt(parts.ToArray());
    }

    /// <summary>Integers (optionally negative, no leading zeros) divisible by <paramref name="k"/>: the remainder is the state.</summary>
    public static Rx MultipleOf(int k)
    {
        // Nodes: 0 start, 1 after the sign, 2 "0", 3 + r: a nonzero-led number with remainder r so far.
        var edges = new List<(int, Rx, int)> { (0, Minus, 1), (0, Rx.Empty, 1), (1, Rx.Byte((byte)'0'), 2) };
        for (int d = 1; d <= 9; d++) edges.Add((1, Rx.Byte((byte)('0' + d)), 3 + d % k));
        for (int r = 0; r < k; r++)
            for (int d = 0; d <= 9; d++) edges.Add((3 + r, Rx.Byte((byte)('0' + d)), 3 + (10 * r + d) % k));
        return new GraphRx(3 + k, edges.ToArray(), [2, 3]);
    }

    /// <summary>Decimal naturals (no leading zeros) in [lo, hi] (hi null: unbounded), lo &gt;= 0.</summary>
    public static Rx Digits(BigInteger lo, BigInteger? hi)
    {
        if (hi is { } h && lo > h) return Rx.Nothing;
        if (hi is null)
        {
            // [lo, 10^len(lo) - 1] then every longer number.
            var s = lo.ToString();
            var upper = BigInteger.Pow(10, s.Length) - 1;
            return Rx.Alt(Digits(lo, upper), Rx.Seq(D19, Rx.Repeat(D, s.Length, -1)));
        }
        var parts = new List<Rx>();
        var loS = lo.ToString();
        var hiS = hi.Value.ToString();
        for (int len = loS.Length; len <= hiS.Length; len++)
        {
            var a = len == loS.Length ? lo : BigInteger.Pow(10, len - 1);
            var b = len == hiS.Length ? hi.Value : BigInteger.Pow(10, len) - 1;
            if (a > b) continue;
            parts.Add(SameLength(a.ToString(), b.ToString()));
        }
        return Rx.Alt(parts.ToArray());
    }

    /// <summary>Numbers with as many digits as <paramref name="a"/> and <paramref name="b"/>, between them.</summary>
    private static Rx SameLength(string a, string b)
    {
        if (a.Length == 0) return Rx.Empty;
        if (a == b) return Rx.Literal(a);
        if (a.All(ch => ch == '0') && b.All(ch => ch == '9')) return Rx.Repeat(D, a.Length, a.Length);
        byte x = (byte)a[0], y = (byte)b[0];
        string ra = a[1..], rb = b[1..];
        if (x == y) return Rx.Seq(Rx.Byte(x), SameLength(ra, rb));
        var parts = new List<Rx>
        {
            Rx.Seq(Rx.Byte(x), SameLength(ra, new string('9', ra.Length))),
            Rx.Seq(Rx.Byte(y), SameLength(new string('0', rb.Length), rb)),
        };
        if (y - x > 1) parts.Add(Rx.Seq(Rx.Range((byte)(x + 1), (byte)(y - 1)), Rx.Repeat(D, ra.Length, ra.Length)));
        return Rx.Alt(parts.ToArray());
    }
}
