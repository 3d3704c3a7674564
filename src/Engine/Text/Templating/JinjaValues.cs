using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace LocalVllm.Engine.Text.Templating;

/// <summary>The value of a name that is not defined (distinct from none).</summary>
internal sealed class Undefined
{
    public static readonly Undefined Instance = new(null);
    private Undefined(string? hint) => Hint = hint;
    /// <summary>Why it is undefined, in jinja2's words ("'x' is undefined", "'dict object' has no attribute 'y'").</summary>
    public string? Hint { get; }
    public static Undefined Because(string hint) => new(hint);
    public override string ToString() => "";
}

/// <summary>A jinja2 <c>namespace()</c>: attributes that <c>set ns.x = ...</c> may change inside loops.</summary>
internal sealed class Namespace
{
    public readonly Dictionary<string, object?> Values = [];
}

/// <summary>A Python tuple: a list that prints as <c>(a, b)</c> (what <c>items()</c>, <c>dictsort</c> and <c>(a, b)</c> make).</summary>
internal sealed class JinjaTuple : List<object?>
{
    public JinjaTuple() { }
    public JinjaTuple(IEnumerable<object?> items) : base(items) { }
}

/// <summary>
/// A string marked safe (<c>|safe</c>, markupsafe's <c>Markup</c>): concatenated with a plain string, it escapes that
/// string's HTML characters, as jinja2 does even with autoescaping off. It lives only within a <c>+</c> expression;
/// everywhere else it is its plain text.
/// </summary>
internal sealed record SafeString(string Value)
{
    public override string ToString() => Value;

    /// <summary>markupsafe's escape: &amp; &lt; &gt; ' " become entities.</summary>
    public static string Escape(string s) => s.Replace("&", "&amp;", StringComparison.Ordinal).Replace("<", "&lt;", StringComparison.Ordinal)
        .Replace(">", "&gt;", StringComparison.Ordinal).Replace("'", "&#39;", StringComparison.Ordinal).Replace("\"", "&#34;", StringComparison.Ordinal);
}

/// <summary>
/// Python semantics for template values: dicts are insertion-ordered <see cref="Dictionary{TKey,TValue}"/>s of string
/// keys, lists are <see cref="List{T}"/>, numbers are long or double, strings are strings, none is null.
/// </summary>
internal static class JinjaValues
{
    public static object? FromJson(JsonNode? node) => node switch
    {
        null => null,
        JsonObject o => o.ToDictionary(kv => kv.Key, kv => FromJson(kv.Value)),
        JsonArray a => a.Select(FromJson).ToList(),
        JsonValue v => v.GetValueKind() switch
        {
            JsonValueKind.String => v.GetValue<string>(),
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            // Python's json: an integer literal is an int, anything with a fraction or exponent a float.
            JsonValueKind.Number => NumberFromJson(v.ToJsonString()),
            _ => null,
        },
        _ => null,
    };

    private static object NumberFromJson(string raw) =>
        raw.AsSpan().IndexOfAny(".eE") < 0 && long.TryParse(raw, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var l)
            ? (object)l // boxed apart: a conditional of long and double would make every integer a double (1 -> 1.0)
            : double.Parse(raw, NumberStyles.Float, CultureInfo.InvariantCulture);

    public static bool Truthy(object? v) => v switch
    {
        null or Undefined => false,
        bool b => b,
        long l => l != 0,
        double d => d != 0,
        string s => s.Length > 0,
        System.Collections.ICollection c => c.Count > 0,
        _ => true,
    };

    /// <summary>Python's <c>str()</c> of a value.</summary>
    public static string Str(object? v) => v switch
    {
        null => "None",
        Undefined => "",
        bool b => b ? "True" : "False",
        long l => l.ToString(CultureInfo.InvariantCulture),
        double d => PyFloat(d),
        string s => s,
        JinjaTuple tuple => "(" + string.Join(", ", tuple.Select(Repr)) + (tuple.Count == 1 ? ",)" : ")"),
        List<object?> list => "[" + string.Join(", ", list.Select(Repr)) + "]",
        SafeString safe => safe.Value,
        Dictionary<string, object?> dict => "{" + string.Join(", ", dict.Select(kv => Repr(kv.Key) + ": " + Repr(kv.Value))) + "}",
        _ => v.ToString() ?? "",
    };

    /// <summary>Python's <c>repr()</c>: strings quoted as Python quotes them (double quotes when only those avoid escaping).</summary>
    public static string Repr(object? v)
    {
        if (v is SafeString safe) v = safe.Value;
        if (v is not string s) return Str(v);
        char quote = s.Contains('\'') && !s.Contains('"') ? '"' : '\'';
        var sb = new StringBuilder().Append(quote);
        foreach (var c in s)
        {
            switch (c)
            {
                case '\\': sb.Append("\\\\"); break;
                case '\n': sb.Append("\\n"); break;
                case '\r': sb.Append("\\r"); break;
                case '\t': sb.Append("\\t"); break;
                default:
                    if (c == quote) sb.Append('\\').Append(c);
                    else if (c < 0x20 || c == 0x7f) sb.Append("\\x").Append(((int)c).ToString("x2", CultureInfo.InvariantCulture));
                    else sb.Append(c);
                    break;
            }
        }
        return sb.Append(quote).ToString();
    }

    /// <summary>
    /// Python's printf-style formatting (<c>'%s: %5.2f' % (a, b)</c> and the <c>format</c> filter): flags <c>-+ 0#</c>,
    /// width, precision, <c>%(name)s</c> with a mapping, and the types s r a d i u f F e E g G x X o c %.
    /// </summary>
    public static string PercentFormat(string format, object? operand, Node at)
    {
        // A tuple spreads over the conversions; any other value (a list, a mapping) is one argument, as in Python.
        IReadOnlyList<object?> args = operand is JinjaTuple t ? t : [operand];
        var mapping = operand as Dictionary<string, object?>;
        var sb = new StringBuilder();
        int next = 0, i = 0;
        TemplateException Error(string what) => new($"Chat template error at line {at.Line}, column {at.Column}: {what}.");
        while (i < format.Length)
        {
            char c = format[i++];
            if (c != '%') { sb.Append(c); continue; }
            if (i >= format.Length) throw Error("incomplete format: a '%' ends the string");
            object? arg = null;
            bool named = false;
            if (format[i] == '(')
            {
                int close = format.IndexOf(')', i);
                if (close < 0) throw Error("incomplete format key: '%(' without ')'");
                var key = format[(i + 1)..close];
                if (mapping is null) throw Error("format requires a mapping for '%(" + key + ")'");
                arg = mapping.TryGetValue(key, out var mv) ? mv : throw Error($"format key '{key}' is not in the mapping");
                named = true;
                i = close + 1;
            }
            string flags = "";
            while (i < format.Length && format[i] is '-' or '+' or ' ' or '0' or '#') flags += format[i++];
            int width = 0;
            while (i < format.Length && char.IsDigit(format[i])) width = width * 10 + (format[i++] - '0');
            int precision = -1;
            if (i < format.Length && format[i] == '.')
            {
                i++;
                precision = 0;
                while (i < format.Length && char.IsDigit(format[i])) precision = precision * 10 + (format[i++] - '0');
            }
            if (i >= format.Length) throw Error("incomplete format");
            char type = format[i++];
            if (type == '%') { sb.Append('%'); continue; }
            if (!named)
            {
                if (next >= args.Count) throw Error("not enough arguments for format string");
                arg = args[next++];
            }
            bool numeric = type is 'd' or 'i' or 'u' or 'f' or 'F' or 'e' or 'E' or 'g' or 'G' or 'x' or 'X' or 'o';
            if (numeric && !IsNumber(arg)) throw Error($"%{type} format: a number is required, not {Repr(arg)}");
            string body = type switch
            {
                's' => Str(arg),
                'r' or 'a' => Repr(arg),
                'c' => arg is string cs ? cs : char.ConvertFromUtf32((int)ToDouble(arg)),
                'd' or 'i' or 'u' => ((long)Math.Truncate(ToDouble(arg))).ToString(CultureInfo.InvariantCulture),
                'f' or 'F' => ToDouble(arg).ToString("F" + (precision < 0 ? 6 : precision), CultureInfo.InvariantCulture),
                'e' or 'E' => Exponential(ToDouble(arg), precision < 0 ? 6 : precision, type == 'E'),
                'g' or 'G' => General(ToDouble(arg), precision < 0 ? 6 : Math.Max(1, precision), type == 'G'),
                'x' => Convert.ToString((long)ToDouble(arg), 16),
                'X' => Convert.ToString((long)ToDouble(arg), 16).ToUpperInvariant(),
                'o' => Convert.ToString((long)ToDouble(arg), 8),
                _ => throw Error($"unsupported format character '{type}'"),
            };
            if (type is 's' or 'r' or 'a' && precision >= 0 && body.Length > precision) body = body[..precision];
            string sign = "";
            if (numeric)
            {
                if (body.StartsWith('-')) { sign = "-"; body = body[1..]; }
                else if (flags.Contains('+')) sign = "+";
                else if (flags.Contains(' ')) sign = " ";
            }
            int pad = width - sign.Length - body.Length;
            if (pad <= 0) sb.Append(sign).Append(body);
            else if (flags.Contains('-')) sb.Append(sign).Append(body).Append(' ', pad);
            else if (numeric && flags.Contains('0')) sb.Append(sign).Append('0', pad).Append(body);
            else sb.Append(' ', pad).Append(sign).Append(body);
        }
        if (mapping is null && next < args.Count) throw Error("not all arguments converted during string formatting");
        return sb.ToString();
    }

    private static string Exponential(double d, int precision, bool upper)
    {
        var r = d.ToString((precision > 0 ? "0." + new string('0', precision) : "0") + "e+00", CultureInfo.InvariantCulture);
        return upper ? r.ToUpperInvariant() : r;
    }

    private static string General(double d, int precision, bool upper)
    {
        if (d == 0) return "0";
        int exp = (int)Math.Floor(Math.Log10(Math.Abs(d)));
        string r;
        if (exp >= -4 && exp < precision)
        {
            r = d.ToString("F" + Math.Max(0, precision - 1 - exp), CultureInfo.InvariantCulture);
            if (r.Contains('.')) r = r.TrimEnd('0').TrimEnd('.');
        }
        else
        {
            r = Exponential(d, precision - 1, upper: false);
            int e = r.IndexOf('e');
            var mantissa = r[..e];
            if (mantissa.Contains('.')) mantissa = mantissa.TrimEnd('0').TrimEnd('.');
            r = mantissa + r[e..];
        }
        return upper ? r.ToUpperInvariant() : r;
    }

    /// <summary>Python's whitespace (str.isspace): .NET's plus the separators U+001C..U+001F.</summary>
    public static bool IsPyWhiteSpace(char c) => char.IsWhiteSpace(c) || c is >= '\x1c' and <= '\x1f';

    public static string PyStrip(string s, bool start = true, bool end = true)
    {
        int a = 0, b = s.Length;
        if (start) while (a < b && IsPyWhiteSpace(s[a])) a++;
        if (end) while (b > a && IsPyWhiteSpace(s[b - 1])) b--;
        return s[a..b];
    }

    /// <summary>Python's <c>str.split()</c> without a separator: runs of whitespace split, none kept.</summary>
    public static List<object?> PySplit(string s)
    {
        var parts = new List<object?>();
        int i = 0;
        while (i < s.Length)
        {
            while (i < s.Length && IsPyWhiteSpace(s[i])) i++;
            int start = i;
            while (i < s.Length && !IsPyWhiteSpace(s[i])) i++;
            if (i > start) parts.Add(s[start..i]);
        }
        return parts;
    }

    /// <summary>A string's code points (Python indexes and counts those, not UTF-16 units).</summary>
    public static string[] CodePoints(string s)
    {
        var points = new List<string>(s.Length);
        for (int i = 0; i < s.Length; i++)
            points.Add(char.IsHighSurrogate(s[i]) && i + 1 < s.Length && char.IsLowSurrogate(s[i + 1]) ? s.Substring(i++, 2) : s[i].ToString());
        return points.ToArray();
    }

    public static long PyLength(string s)
    {
        long n = s.Length;
        for (int i = 0; i + 1 < s.Length; i++)
            if (char.IsHighSurrogate(s[i]) && char.IsLowSurrogate(s[i + 1])) { n--; i++; }
        return n;
    }

    private static string PyFloat(double d)
    {
        if (double.IsNaN(d)) return "NaN";
        if (double.IsInfinity(d)) return d > 0 ? "Infinity" : "-Infinity";
        var r = d.ToString("R", CultureInfo.InvariantCulture);
        if (r.Contains('E')) return r.Replace("E", "e");
        return r.Contains('.') ? r : r + ".0";
    }

    /// <summary>Python equality (deep for lists and dicts; 1 == 1.0).</summary>
    public static bool Equal(object? a, object? b)
    {
        if (a is Undefined || b is Undefined) return a is Undefined && b is Undefined;
        if (a is null || b is null) return a is null && b is null;
        if (IsNumber(a) && IsNumber(b)) return ToDouble(a) == ToDouble(b);
        if (a is string sa && b is string sb) return sa == sb;
        if (a is List<object?> la && b is List<object?> lb) return la.Count == lb.Count && la.Zip(lb).All(p => Equal(p.First, p.Second));
        if (a is Dictionary<string, object?> da && b is Dictionary<string, object?> db)
            return da.Count == db.Count && da.All(kv => db.TryGetValue(kv.Key, out var o) && Equal(kv.Value, o));
        return ReferenceEquals(a, b) || a.Equals(b);
    }

    /// <summary>Python's name of a value's type, as its error messages write it.</summary>
    public static string PyType(object? v) => v switch
    {
        null => "NoneType", bool => "bool", long => "int", double => "float", string or SafeString => "str", JinjaTuple => "tuple",
        List<object?> => "list", Dictionary<string, object?> => "dict", Undefined => "Undefined", _ => v.GetType().Name,
    };

    public static bool IsNumber(object? v) => v is long or double || v is bool;
    public static double ToDouble(object? v) => v switch { long l => l, double d => d, bool b => b ? 1 : 0, _ => throw new InvalidCastException() };

    /// <summary>
    /// <c>json.dumps(x, ensure_ascii, indent, separators, sort_keys)</c> as transformers' <c>tojson</c> calls it: keys in
    /// insertion order unless sorted; separators <c>", "</c>/<c>": "</c>, or <c>","</c>/<c>": "</c> with an indent.
    /// </summary>
    public static string ToJson(object? value, int? indent, string? itemSeparator = null, string? keySeparator = null, bool sortKeys = false, bool ensureAscii = false)
    {
        var sb = new StringBuilder();
        var o = new JsonStyle(indent, itemSeparator ?? (indent is null ? ", " : ","), keySeparator ?? ": ", sortKeys, ensureAscii);
        WriteJson(sb, value, o, 0);
        return sb.ToString();
    }

    private sealed record JsonStyle(int? Indent, string ItemSeparator, string KeySeparator, bool SortKeys, bool EnsureAscii);

    private static void WriteJson(StringBuilder sb, object? v, JsonStyle o, int depth)
    {
        int? indent = o.Indent;
        switch (v)
        {
            case null or Undefined: sb.Append("null"); break;
            case bool b: sb.Append(b ? "true" : "false"); break;
            case long l: sb.Append(l.ToString(CultureInfo.InvariantCulture)); break;
            case double d: sb.Append(PyFloat(d)); break;
            case string s: WriteJsonString(sb, s, o.EnsureAscii); break;
            case SafeString safe: WriteJsonString(sb, safe.Value, o.EnsureAscii); break;
            case List<object?> list:
                if (list.Count == 0) { sb.Append("[]"); break; }
                sb.Append('[');
                for (int i = 0; i < list.Count; i++)
                {
                    if (i > 0) sb.Append(o.ItemSeparator);
                    NewLine(sb, indent, depth + 1);
                    WriteJson(sb, list[i], o, depth + 1);
                }
                NewLine(sb, indent, depth);
                sb.Append(']');
                break;
            case Dictionary<string, object?> dict:
                if (dict.Count == 0) { sb.Append("{}"); break; }
                sb.Append('{');
                int n = 0;
                foreach (var (k, val) in o.SortKeys ? dict.OrderBy(kv => kv.Key, StringComparer.Ordinal) : dict.AsEnumerable())
                {
                    if (n++ > 0) sb.Append(o.ItemSeparator);
                    NewLine(sb, indent, depth + 1);
                    WriteJsonString(sb, k, o.EnsureAscii);
                    sb.Append(o.KeySeparator);
                    WriteJson(sb, val, o, depth + 1);
                }
                NewLine(sb, indent, depth);
                sb.Append('}');
                break;
            case Namespace: sb.Append("{}"); break;
            default: WriteJsonString(sb, v.ToString() ?? "", o.EnsureAscii); break;
        }
    }

    private static void NewLine(StringBuilder sb, int? indent, int depth)
    {
        if (indent is not int k) return;
        sb.Append('\n').Append(' ', k * depth);
    }

    /// <summary>A string as Python's json.dumps writes it (the one writer: tojson and the JSON Schema compiler use it).</summary>
    internal static void WriteJsonString(StringBuilder sb, string s, bool ensureAscii)
    {
        sb.Append('"');
        foreach (var c in s)
        {
            switch (c)
            {
                case '"': sb.Append("\\\""); break;
                case '\\': sb.Append("\\\\"); break;
                case '\n': sb.Append("\\n"); break;
                case '\r': sb.Append("\\r"); break;
                case '\t': sb.Append("\\t"); break;
                case '\b': sb.Append("\\b"); break;
                case '\f': sb.Append("\\f"); break;
                default:
                    if (c < 0x20 || (ensureAscii && c > 0x7f)) sb.Append("\\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture));
                    else sb.Append(c);
                    break;
            }
        }
        sb.Append('"');
    }
}
