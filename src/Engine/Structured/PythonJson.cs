using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace LocalVllm.Engine.Structured;

/// <summary>
/// JSON text as Python's <c>json.dumps(value, indent=None, ensure_ascii=False)</c> writes it after <c>json.loads</c>:
/// separators <c>", "</c> and <c>": "</c>, keys in order, integers as written, other numbers as Python's
/// <c>repr(float)</c>. MaskBench's protocol serialises its instances this way.
/// </summary>
internal static class PythonJson
{
    public static string Dumps(JsonNode? node)
    {
        var sb = new StringBuilder();
        Write(sb, node);
        return sb.ToString();
    }

    private static void Write(StringBuilder sb, JsonNode? node)
    {
        switch (node)
        {
            case null: sb.Append("null"); break;
            case JsonObject o:
                sb.Append('{');
                bool first = true;
                foreach (var (k, item) in o)
                {
                    if (!first) sb.Append(", ");
                    first = false;
                    sb.Append(JsonSchemaGrammar.PythonJsonString(k)).Append(": ");
                    Write(sb, item);
                }
                sb.Append('}');
                break;
            case JsonArray a:
                sb.Append('[');
                for (int i = 0; i < a.Count; i++)
                {
                    if (i > 0) sb.Append(", ");
                    Write(sb, a[i]);
                }
                sb.Append(']');
                break;
            default:
                var v = (JsonValue)node;
                switch (v.GetValueKind())
                {
                    case JsonValueKind.String: sb.Append(JsonSchemaGrammar.PythonJsonString(v.GetValue<string>())); break;
                    case JsonValueKind.True: sb.Append("true"); break;
                    case JsonValueKind.False: sb.Append("false"); break;
                    case JsonValueKind.Null: sb.Append("null"); break;
                    default: sb.Append(Number(v.ToJsonString())); break;
                }
                break;
        }
    }

    /// <summary>A JSON number as Python prints it after parsing: integers unchanged, floats as <c>repr</c>.</summary>
    public static string Number(string raw)
    {
        if (!raw.Contains('.') && !raw.Contains('e') && !raw.Contains('E'))
        {
            var i = System.Numerics.BigInteger.Parse(raw, CultureInfo.InvariantCulture);
            return i.ToString(CultureInfo.InvariantCulture);
        }
        double d = double.Parse(raw, CultureInfo.InvariantCulture);
        if (double.IsInfinity(d)) return d > 0 ? "Infinity" : "-Infinity";
        if (d == 0) return raw.StartsWith('-') ? "-0.0" : "0.0";
        // Shortest round-trip digits and the exponent of the first significant one, then Python's layout.
        string shortest = Math.Abs(d).ToString("R", CultureInfo.InvariantCulture);
        int e = shortest.IndexOfAny(['E', 'e']);
        string mant = e >= 0 ? shortest[..e] : shortest;
        int exp10 = e >= 0 ? int.Parse(shortest[(e + 1)..], CultureInfo.InvariantCulture) : 0;
        int dot = mant.IndexOf('.');
        string intPart = dot >= 0 ? mant[..dot] : mant;
        string all = intPart + (dot >= 0 ? mant[(dot + 1)..] : "");
        string significant = all.TrimStart('0');
        int exp = intPart.Length - 1 - (all.Length - significant.Length) + exp10;
        string digits = significant.TrimEnd('0');
        if (digits.Length == 0) digits = "0";
        string sign = d < 0 ? "-" : "";
        if (exp >= -4 && exp < 16)
        {
            string s;
            if (exp >= 0)
            {
                string ip = digits.Length > exp + 1 ? digits[..(exp + 1)] : digits.PadRight(exp + 1, '0');
                string fp = digits.Length > exp + 1 ? digits[(exp + 1)..] : "0";
                s = ip + "." + fp;
            }
            else s = "0." + new string('0', -exp - 1) + digits;
            return sign + s;
        }
        string m = digits.Length == 1 ? digits : digits[0] + "." + digits[1..];
        return sign + m + "e" + (exp < 0 ? "-" : "+") + Math.Abs(exp).ToString("00", CultureInfo.InvariantCulture);
    }
}
