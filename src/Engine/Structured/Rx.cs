using System.Text;

namespace LocalVllm.Engine.Structured;

/// <summary>
/// A regular expression over bytes with references to grammar rules: the body of one rule. Leaves are byte ranges and
/// rule references; inner nodes are sequence, alternation, bounded or unbounded repetition, an already determinised
/// byte automaton, and a small graph whose edges are expressions (for shapes such as an object's properties, whose
/// regular-expression form would be exponential). <see cref="Key"/> is a canonical text: equal keys compile to the same
/// automaton, so rules shared by many grammars (a JSON string, a number) are compiled and their masks cached once.
/// </summary>
internal abstract class Rx
{
    private string? _key;

    /// <summary>A canonical text of the expression; equal keys mean equal languages (same structure).</summary>
    public string Key => _key ??= BuildKey();

    protected abstract string BuildKey();

    public static readonly Rx Empty = new SeqRx([]);
    public static readonly Rx Nothing = new AltRx([]);

    public static Rx Byte(byte b) => new BytesRx([(b, b)]);
    public static Rx Range(byte lo, byte hi) => new BytesRx([(lo, hi)]);
    public static Rx Ranges(IEnumerable<(byte Lo, byte Hi)> ranges) => new BytesRx(ranges.ToArray());

    /// <summary>The UTF-8 bytes of <paramref name="text"/>, in order.</summary>
    public static Rx Literal(string text) => Bytes(Encoding.UTF8.GetBytes(text));

    public static Rx Bytes(byte[] bytes) => bytes.Length == 1 ? Byte(bytes[0]) : new SeqRx(bytes.Select(Byte).ToArray());

    public static Rx Seq(params Rx[] items)
    {
        var flat = new List<Rx>();
        foreach (var i in items)
        {
            if (i is SeqRx s) flat.AddRange(s.Items);
            else flat.Add(i);
        }
        if (flat.Any(i => i is AltRx { Items.Length: 0 })) return Nothing;
        return flat.Count == 1 ? flat[0] : new SeqRx(flat.ToArray());
    }

    public static Rx Alt(params Rx[] items)
    {
        var flat = new List<Rx>();
        var seen = new HashSet<string>();
        foreach (var i in items)
        {
            foreach (var x in i is AltRx a ? a.Items : [i])
                if (seen.Add(x.Key)) flat.Add(x);
        }
        return flat.Count == 1 ? flat[0] : new AltRx(flat.ToArray());
    }

    public static Rx Repeat(Rx item, int min, int max) =>
        max == 1 && min == 1 ? item : max == 0 ? Empty : new RepeatRx(item, min, max);

    public static Rx Star(Rx item) => new RepeatRx(item, 0, -1);
    public static Rx Plus(Rx item) => new RepeatRx(item, 1, -1);
    public static Rx Optional(Rx item) => new RepeatRx(item, 0, 1);
    public static Rx Ref(int rule) => new RefRx(rule);

    public bool IsNothing => this is AltRx { Items.Length: 0 };
}

internal sealed class BytesRx((byte Lo, byte Hi)[] ranges) : Rx
{
    public (byte Lo, byte Hi)[] Spans { get; } = ranges;
    protected override string BuildKey() => "[" + string.Join(",", Spans.OrderBy(r => r.Lo).Select(r => r.Lo == r.Hi ? $"{r.Lo:x2}" : $"{r.Lo:x2}-{r.Hi:x2}")) + "]";
}

internal sealed class SeqRx(Rx[] items) : Rx
{
    public Rx[] Items { get; } = items;
    protected override string BuildKey() => "(" + string.Join(" ", Items.Select(i => i.Key)) + ")";
}

internal sealed class AltRx(Rx[] items) : Rx
{
    public Rx[] Items { get; } = items;
    protected override string BuildKey() => "(" + string.Join("|", Items.Select(i => i.Key)) + ")";
}

internal sealed class RepeatRx(Rx item, int min, int max) : Rx
{
    public Rx Item { get; } = item;
    public int Min { get; } = min;
    /// <summary>-1: unbounded.</summary>
    public int Max { get; } = max;
    protected override string BuildKey() => $"{Item.Key}{{{Min},{Max}}}";
}

internal sealed class RefRx(int rule) : Rx
{
    public int Rule { get; } = rule;
    protected override string BuildKey() => $"<{Rule}>";
}

/// <summary>A byte automaton (no rule references) built elsewhere, e.g. by intersection or difference.</summary>
internal sealed class DfaRx(RuleDfa dfa) : Rx
{
    public RuleDfa Dfa { get; } = dfa;
    protected override string BuildKey() => Dfa.Key;
}

/// <summary>A graph of <paramref name="nodes"/> nodes whose edges are expressions; node 0 is the start.</summary>
internal sealed class GraphRx(int nodes, (int From, Rx Label, int To)[] edges, int[] finals) : Rx
{
    public int Nodes { get; } = nodes;
    public (int From, Rx Label, int To)[] Edges { get; } = edges;
    public int[] Finals { get; } = finals;
    protected override string BuildKey() =>
        $"G{Nodes}[" + string.Join(";", Edges.Select(e => $"{e.From}>{e.To}:{e.Label.Key}")) + "]F" + string.Join(",", Finals);
}
