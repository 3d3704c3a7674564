using System.Globalization;

namespace LocalVllm.Engine.Text.Templating;

/// <summary>The filters, tests and string methods that real chat templates call.</summary>
internal static class JinjaFilters
{
    private static TemplateException Error(Node at, string what) =>
        new($"Chat template error at line {at.Line}, column {at.Column}: {what}.");

    public static object? Apply(string name, object? v, List<object?> args, Dictionary<string, object?> kwargs, Node at)
    {
        object? Arg(int i, string kw, object? dflt = null) => i < args.Count ? args[i] : kwargs.TryGetValue(kw, out var x) ? x : dflt;
        switch (name)
        {
            case "tojson":
            {
                // transformers' tojson: json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False).
                var separators = Arg(2, "separators");
                if (separators is not (null or Undefined) && separators is not List<object?> { Count: 2 })
                    throw Error(at, "tojson's separators must be a pair (item separator, key separator)");
                var pair = separators as List<object?>;
                return JinjaValues.ToJson(v, Arg(1, "indent") is long n ? (int)n : null,
                    pair is null ? null : JinjaValues.Str(pair[0]), pair is null ? null : JinjaValues.Str(pair[1]),
                    JinjaValues.Truthy(Arg(3, "sort_keys", false)), JinjaValues.Truthy(Arg(0, "ensure_ascii", false)));
            }
            case "trim":
                return Arg(0, "chars") is string trimChars ? JinjaValues.Str(v).Trim(trimChars.ToCharArray()) : JinjaValues.PyStrip(JinjaValues.Str(v));
            case "indent":
            {
                // jinja2's do_indent, quirks included (a trailing newline is added before splitting into lines).
                var width = Arg(0, "width", 4L);
                string indention = width is string w ? w : new string(' ', (int)(long)width!);
                bool first = JinjaValues.Truthy(Arg(1, "first", false)), blank = JinjaValues.Truthy(Arg(2, "blank", false));
                var lines = SplitLines(JinjaValues.Str(v) + "\n");
                string rv;
                if (blank) rv = string.Join("\n" + indention, lines);
                else
                {
                    rv = lines.Count > 0 ? lines[0] : "";
                    if (lines.Count > 1) rv += "\n" + string.Join("\n", lines.Skip(1).Select(l => l.Length > 0 ? indention + l : l));
                }
                return first ? indention + rv : rv;
            }
            case "sort":
            {
                bool reverse = JinjaValues.Truthy(Arg(0, "reverse", false)), caseSensitive = JinjaValues.Truthy(Arg(1, "case_sensitive", false));
                var attribute = Arg(2, "attribute") as string;
                object? Key(object? item)
                {
                    var k = attribute is null ? item : Attr(item, attribute);
                    return !caseSensitive && k is string ks ? ks.ToLowerInvariant() : k;
                }
                var sorted = AsList(v, at).OrderBy(Key, Comparer<object?>.Create((a, b) => Compare(a, b, at))).ToList();
                if (reverse) sorted.Reverse();
                return sorted;
            }
            case "format":
                return JinjaValues.PercentFormat(JinjaValues.Str(v), kwargs.Count > 0 ? new Dictionary<string, object?>(kwargs) : new JinjaTuple(args), at);
            case "length" or "count":
                return v switch
                {
                    string s => JinjaValues.PyLength(s),
                    System.Collections.ICollection c => (long)c.Count,
                    null or Undefined => 0L,
                    _ => throw Error(at, $"object of type {v.GetType().Name} has no length"),
                };
            case "first":
                return v is List<object?> { Count: > 0 } fl ? fl[0] : v is string { Length: > 0 } fs ? fs[0].ToString() : Undefined.Instance;
            case "last":
                return v is List<object?> { Count: > 0 } ll ? ll[^1] : v is string { Length: > 0 } ls ? ls[^1].ToString() : Undefined.Instance;
            case "default" or "d":
            {
                bool boolean = JinjaValues.Truthy(Arg(1, "boolean", false));
                return v is Undefined || (boolean && !JinjaValues.Truthy(v)) ? Arg(0, "default_value", "") : v;
            }
            case "lower": return JinjaValues.Str(v).ToLowerInvariant();
            case "upper": return JinjaValues.Str(v).ToUpperInvariant();
            case "capitalize":
            {
                var s = JinjaValues.Str(v);
                return s.Length == 0 ? s : char.ToUpperInvariant(s[0]) + s[1..].ToLowerInvariant();
            }
            case "title": return CultureInfo.InvariantCulture.TextInfo.ToTitleCase(JinjaValues.Str(v).ToLowerInvariant());
            case "replace": return JinjaValues.Str(v).Replace(JinjaValues.Str(Arg(0, "old")), JinjaValues.Str(Arg(1, "new")), StringComparison.Ordinal);
            case "join":
            {
                var items = AsList(v, at);
                if (Arg(1, "attribute") is string attr) items = items.Select(i => Attr(i, attr)).ToList();
                return string.Join(JinjaValues.Str(Arg(0, "d", "")), items.Select(JinjaValues.Str));
            }
            case "list": return AsList(v, at);
            case "string": return JinjaValues.Str(v);
            case "int": return v switch { long l => l, double dd => (long)dd, string s when long.TryParse(s, out var p) => p, _ => Arg(0, "default", 0L) };
            case "float": return v switch { long l => (double)l, double dd => dd, string s when double.TryParse(s, CultureInfo.InvariantCulture, out var p) => p, _ => 0.0 };
            case "abs": return v is long al ? (object)Math.Abs(al) : Math.Abs(JinjaValues.ToDouble(v));
            case "safe": return v is SafeString ? v : new SafeString(JinjaValues.Str(v));
            case "items":
                return v is Dictionary<string, object?> d ? d.Select(kv => (object?)new JinjaTuple { kv.Key, kv.Value }).ToList() : throw Error(at, "'items' needs a mapping");
            case "dictsort":
            {
                if (v is not Dictionary<string, object?> ds) throw Error(at, "'dictsort' needs a mapping");
                bool caseSensitive = JinjaValues.Truthy(Arg(0, "case_sensitive", false)), reverse = JinjaValues.Truthy(Arg(2, "reverse", false));
                bool byValue = JinjaValues.Str(Arg(1, "by", "key")) == "value";
                object? Key(KeyValuePair<string, object?> kv)
                {
                    var k = byValue ? kv.Value : kv.Key;
                    return !caseSensitive && k is string ks ? ks.ToLowerInvariant() : k;
                }
                var pairs = ds.OrderBy(Key, Comparer<object?>.Create((a, b) => Compare(a, b, at))).Select(kv => (object?)new JinjaTuple { kv.Key, kv.Value }).ToList();
                if (reverse) pairs.Reverse();
                return pairs;
            }
            case "reverse": return v is string rs ? new string(rs.Reverse().ToArray()) : AsList(v, at).AsEnumerable().Reverse().ToList();
            case "unique": return AsList(v, at).Aggregate(new List<object?>(), (acc, x) => { if (!acc.Any(y => JinjaValues.Equal(x, y))) acc.Add(x); return acc; });
            case "selectattr" or "rejectattr":
            {
                var attr = JinjaValues.Str(Arg(0, "attr"));
                bool select = name == "selectattr";
                return AsList(v, at).Where(i =>
                {
                    var a = Attr(i, attr);
                    bool ok = args.Count > 1 ? Test(JinjaValues.Str(args[1]), a, args.Skip(2).ToList(), at) : JinjaValues.Truthy(a);
                    return ok == select;
                }).ToList();
            }
            case "select" or "reject":
            {
                bool select = name == "select";
                return AsList(v, at).Where(i =>
                {
                    bool ok = args.Count > 0 ? Test(JinjaValues.Str(args[0]), i, args.Skip(1).ToList(), at) : JinjaValues.Truthy(i);
                    return ok == select;
                }).ToList();
            }
            case "map":
            {
                if (kwargs.TryGetValue("attribute", out var attr))
                {
                    var dflt = kwargs.GetValueOrDefault("default", Undefined.Instance);
                    return AsList(v, at).Select(i => Attr(i, JinjaValues.Str(attr)) is var x && x is Undefined ? dflt : x).ToList();
                }
                if (args.Count > 0)
                    return AsList(v, at).Select(i => Apply(JinjaValues.Str(args[0]), i, args.Skip(1).ToList(), [], at)).ToList();
                throw Error(at, "'map' needs a filter name or attribute=");
            }
            default:
                throw Error(at, $"unsupported filter '{name}'");
        }
    }

    public static bool Test(string name, object? v, List<object?> args, Node at) => name switch
    {
        "defined" => v is not Undefined,
        "undefined" => v is Undefined,
        "none" => v is null,
        "string" => v is string,
        "number" => v is long or double,
        "integer" => v is long,
        "float" => v is double,
        "boolean" => v is bool,
        "true" => v is true,
        "false" => v is false,
        "mapping" => v is Dictionary<string, object?>,
        "sequence" or "iterable" => v is string or List<object?> or Dictionary<string, object?>,
        "callable" => false,
        "equalto" or "eq" or "==" or "sameas" => args.Count > 0 && JinjaValues.Equal(v, args[0]),
        "ne" or "!=" => args.Count > 0 && !JinjaValues.Equal(v, args[0]),
        "in" => args.Count > 0 && args[0] switch
        {
            List<object?> l => l.Any(x => JinjaValues.Equal(x, v)),
            string s => v is string sub && s.Contains(sub, StringComparison.Ordinal),
            Dictionary<string, object?> d => v is string k && d.ContainsKey(k),
            _ => false,
        },
        "odd" => v is long o && o % 2 != 0,
        "even" => v is long e && e % 2 == 0,
        "divisibleby" => v is long n && args.Count > 0 && args[0] is long m && m != 0 && n % m == 0,
        "lower" => v is string ls && ls == ls.ToLowerInvariant(),
        "upper" => v is string us && us == us.ToUpperInvariant(),
        _ => throw Error(at, $"unsupported test '{name}'"),
    };

    /// <summary>The string methods templates may call; other attributes of a string are undefined.</summary>
    public static readonly HashSet<string> StringMethods =
        ["startswith", "endswith", "strip", "lstrip", "rstrip", "upper", "lower", "title", "capitalize", "replace", "split", "splitlines", "find", "count", "join", "isdigit"];

    public static object? StringMethod(string s, string name, List<object?> args, Node at)
    {
        string? StrArg(int i) => i < args.Count && args[i] is string a ? a : null;
        switch (name)
        {
            case "startswith":
                return args.Count > 0 && (args[0] is List<object?> ps ? ps.Any(p => s.StartsWith(JinjaValues.Str(p), StringComparison.Ordinal)) : s.StartsWith(JinjaValues.Str(args[0]), StringComparison.Ordinal));
            case "endswith":
                return args.Count > 0 && (args[0] is List<object?> es ? es.Any(p => s.EndsWith(JinjaValues.Str(p), StringComparison.Ordinal)) : s.EndsWith(JinjaValues.Str(args[0]), StringComparison.Ordinal));
            case "strip": return StrArg(0) is string sc ? s.Trim(sc.ToCharArray()) : JinjaValues.PyStrip(s);
            case "lstrip": return StrArg(0) is string lc ? s.TrimStart(lc.ToCharArray()) : JinjaValues.PyStrip(s, end: false);
            case "rstrip": return StrArg(0) is string rc ? s.TrimEnd(rc.ToCharArray()) : JinjaValues.PyStrip(s, start: false);
            case "upper": return s.ToUpperInvariant();
            case "lower": return s.ToLowerInvariant();
            case "title": return CultureInfo.InvariantCulture.TextInfo.ToTitleCase(s.ToLowerInvariant());
            case "capitalize": return s.Length == 0 ? s : char.ToUpperInvariant(s[0]) + s[1..].ToLowerInvariant();
            case "replace": return s.Replace(JinjaValues.Str(args[0]), JinjaValues.Str(args[1]), StringComparison.Ordinal);
            case "split":
            {
                var sep = StrArg(0);
                int max = args.Count > 1 && args[1] is long m ? (int)m : -1;
                if (sep is null) return JinjaValues.PySplit(s);
                var split = max >= 0 ? s.Split(sep, max + 1) : s.Split(sep);
                return split.Select(p => (object?)p).ToList();
            }
            case "splitlines": return s.Split('\n').Select(l => (object?)l.TrimEnd('\r')).ToList();
            case "find": return (long)s.IndexOf(JinjaValues.Str(args[0]), StringComparison.Ordinal);
            case "count": return (long)(s.Length - s.Replace(JinjaValues.Str(args[0]), "", StringComparison.Ordinal).Length) / Math.Max(1, JinjaValues.Str(args[0]).Length);
            case "join": return string.Join(s, AsList(args[0], at).Select(JinjaValues.Str));
            case "isdigit": return s.Length > 0 && s.All(char.IsDigit);
            default: throw Error(at, $"unsupported string method '{name}'");
        }
    }

    /// <summary>Python's ordering of two sort keys: numbers with numbers, strings with strings (by code point), lists element-wise.</summary>
    public static int Compare(object? a, object? b, Node at)
    {
        if (JinjaValues.IsNumber(a) && JinjaValues.IsNumber(b)) return JinjaValues.ToDouble(a).CompareTo(JinjaValues.ToDouble(b));
        if (a is string sa && b is string sb) return string.CompareOrdinal(sa, sb);
        if (a is List<object?> la && b is List<object?> lb)
        {
            for (int i = 0; i < Math.Min(la.Count, lb.Count); i++)
                if (Compare(la[i], lb[i], at) is var c && c != 0) return c;
            return la.Count.CompareTo(lb.Count);
        }
        throw Error(at, $"cannot order {JinjaValues.Repr(a)} and {JinjaValues.Repr(b)}");
    }

    /// <summary>Python's str.splitlines() for \n-separated text (the template source's newlines are already \n).</summary>
    private static List<string> SplitLines(string s)
    {
        var lines = s.Split('\n').ToList();
        if (lines.Count > 0 && lines[^1].Length == 0) lines.RemoveAt(lines.Count - 1);
        return lines;
    }

    private static object? Attr(object? item, string attr)
    {
        object? cur = item;
        foreach (var part in attr.Split('.'))
            cur = cur is Dictionary<string, object?> d && d.TryGetValue(part, out var v) ? v : Undefined.Instance;
        return cur;
    }

    private static List<object?> AsList(object? v, Node at) => v switch
    {
        List<object?> l => l,
        Dictionary<string, object?> d => d.Keys.Select(k => (object?)k).ToList(),
        string s => s.Select(c => (object?)c.ToString()).ToList(),
        null or Undefined => [],
        _ => throw Error(at, $"'{JinjaValues.Str(v)}' is not a sequence"),
    };
}
