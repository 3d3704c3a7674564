using System.Globalization;
using System.Numerics;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace LocalVllm.Engine.Structured;

/// <summary>
/// Compiles a JSON Schema into a <see cref="Grammar"/> whose language is the schema's valid instances (as JSON text in
/// the chosen whitespace style). Each subschema becomes a rule, so <c>$ref</c> recursion is plain rule recursion.
/// Properties come in the order of <c>properties</c>; additional properties (allowed unless
/// <c>additionalProperties</c> is false) may appear between them and after. A validation keyword that cannot be
/// honoured is a <see cref="GrammarException"/> naming it: ignoring one would let invalid output through. Annotations
/// (title, description, examples, ...) and keywords that are not JSON Schema's (x-..., vendor extensions) are ignored,
/// as validators ignore them; so is a <c>format</c> that no JSON Schema draft defines.
/// </summary>
internal sealed class JsonSchemaGrammar
{
    private static readonly HashSet<string> Annotations =
    [
        "$schema", "$id", "id", "$comment", "title", "description", "default", "examples", "example", "readOnly", "writeOnly",
        "deprecated", "$anchor", "contentMediaType", "contentEncoding", "contentSchema", "$vocabulary", "nullable", "discriminator",
        "definitions", "$defs", "markdownDescription", "externalDocs", "xml",
    ];

    private static readonly HashSet<string> Handled =
    [
        "type", "enum", "const", "properties", "required", "additionalProperties", "items", "prefixItems", "additionalItems",
        "minItems", "maxItems", "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
        "exclusiveMaximum", "anyOf", "oneOf", "allOf", "$ref", "patternProperties", "minProperties", "maxProperties", "multipleOf",
    ];

    private static readonly HashSet<string> Unsupported =
    [
        "not", "if", "then", "else", "dependencies", "dependentRequired", "dependentSchemas",
        "propertyNames", "unevaluatedProperties", "unevaluatedItems", "contains",
        "minContains", "maxContains", "$dynamicRef", "$recursiveRef", "$dynamicAnchor", "$recursiveAnchor",
    ];

    private static readonly string[] AllTypes = ["null", "boolean", "object", "array", "string", "number"];

    /// <summary>RFC 3339 full-date: days per month, February 29 only in leap years.</summary>
    private const string Date =
        @"\d{4}-(0[13578]|1[02])-(0[1-9]|[12]\d|3[01])|\d{4}-(0[469]|11)-(0[1-9]|[12]\d|30)|\d{4}-02-(0[1-9]|1\d|2[0-8])" +
        @"|(\d\d(0[48]|[2468][048]|[13579][26])|([02468][048]|[13579][26])00)-02-29";

    private static readonly Dictionary<string, string> Formats = new()
    {
        ["date-time"] = "(" + Date + @")[Tt ]([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d+)?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)",
        ["date"] = Date,
        ["time"] = @"([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d+)?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)",
        ["email"] = @"[^\s@""\\<>()\[\],;:]+@[^\s@""\\<>()\[\],;:]+",
        ["uuid"] = @"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
        ["uri"] = @"[A-Za-z][A-Za-z0-9+.\-]*:[^\s""\\<>{}|^`]*",
        ["uri-reference"] = @"[^\s""\\<>{}|^`]*",
        ["ipv4"] = @"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)",
        ["ipv6"] = @"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*",
        ["hostname"] = @"[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*",
    };

    private static readonly HashSet<string> UnsupportedFormats =
        ["duration", "idn-email", "idn-hostname", "iri", "iri-reference", "uri-template", "json-pointer", "relative-json-pointer", "regex"];

    private readonly JsonNode _root;
    private readonly Grammar _g;
    private readonly bool _compact;
    private readonly bool _strict;
    private readonly Dictionary<JsonNode, int> _rules = new(ReferenceEqualityComparer.Instance);
    private readonly Dictionary<string, int> _leafRules = [];
    private readonly Dictionary<string, int> _rulesByText = [];
    private int _anyValue = -1;

    private JsonSchemaGrammar(Grammar g, JsonNode root, bool compact, bool strict = false)
    {
        _strict = strict;
        _g = g;
        _root = root;
        _compact = compact;
    }

    /// <summary>
    /// The grammar of <paramref name="schema"/>'s instances; <paramref name="compact"/>: no whitespace at all;
    /// <paramref name="strict"/>: an object whose schema does not mention additionalProperties gets only its listed
    /// properties (as XGrammar's strict mode and OpenAI's strict schemas do).
    /// </summary>
    public static Grammar Build(string schema, bool compact, bool strict)
    {
        var g = new Grammar();
        g.Start = AddSchema(g, schema, compact, strict);
        return g;
    }

    /// <summary>Adds the rules of <paramref name="schema"/> to <paramref name="g"/>; returns the rule of its instances.</summary>
    public static int AddSchema(Grammar g, string schema, bool compact, bool strict)
    {
        JsonNode? root;
        try
        {
            root = JsonNode.Parse(schema, documentOptions: new JsonDocumentOptions { AllowTrailingCommas = false });
        }
        catch (JsonException e)
        {
            throw new GrammarException($"the JSON schema is not valid JSON: {e.Message}");
        }
        if (root is null) throw new GrammarException("the JSON schema is null; use true for any value");
        var c = new JsonSchemaGrammar(g, root, compact, strict);
        int start = g.Declare("schema");
        g.Define(start, c.ValueRx(root, "#"));
        return start;
    }

    /// <summary>The grammar of any JSON value (an object when <paramref name="objectOnly"/>).</summary>
    public static Grammar AnyJson(bool objectOnly, bool compact)
    {
        var c = new JsonSchemaGrammar(new Grammar(), JsonValue.Create(true), compact);
        int start = c._g.Declare("root");
        c._g.Define(start, objectOnly ? c.AnyObjectRx() : Rx.Ref(c.AnyValue()));
        return c._g;
    }

    private Rx Ws => _compact ? Rx.Empty : Rx.Star(Rx.Ranges([((byte)' ', (byte)' '), ((byte)'\t', (byte)'\n'), ((byte)'\r', (byte)'\r')]));
    private Rx Comma => Rx.Seq(Ws, Rx.Byte((byte)','), Ws);
    private Rx Colon => Rx.Seq(Ws, Rx.Byte((byte)':'), Ws);

    private int Leaf(string name, Rx body)
    {
        if (_leafRules.TryGetValue(body.Key, out int r)) return r;
        return _leafRules[body.Key] = _g.Add(name, body);
    }

    private int RuleFor(JsonNode schema, string path)
    {
        if (_rules.TryGetValue(schema, out int r)) return r;
        // Schemas made by merging (allOf, $ref siblings) are new nodes each time: equal text means the same schema
        // (references are absolute within the one root), which is what ends recursion through a merge.
        var text = schema.ToJsonString();
        if (_rulesByText.TryGetValue(text, out r)) return _rules[schema] = r;
        r = _g.Declare(path);
        _rules[schema] = r;
        _rulesByText[text] = r;
        _g.Define(r, ValueRx(schema, path));
        return r;
    }

    private Rx RefTo(JsonNode? schema, string path) => schema switch
    {
        JsonValue v when v.GetValueKind() == JsonValueKind.False => Rx.Nothing,
        JsonValue v when v.GetValueKind() == JsonValueKind.True => Rx.Ref(AnyValue()),
        null => throw new GrammarException($"{path}: a schema is null"),
        _ => Rx.Ref(RuleFor(schema, path)),
    };

    // ---- schemas ---------------------------------------------------------------------------------------------------

    private Rx ValueRx(JsonNode schema, string path)
    {
        if (schema is JsonValue b && b.GetValueKind() is JsonValueKind.True or JsonValueKind.False)
            return b.GetValueKind() == JsonValueKind.True ? Rx.Ref(AnyValue()) : Rx.Nothing;
        if (schema is not JsonObject o) throw new GrammarException($"{path}: a schema must be an object or a boolean, not {schema.GetValueKind()}");

        foreach (var (key, _) in o)
        {
            if (Unsupported.Contains(key)) throw new GrammarException($"{path}: the keyword '{key}' is not supported by the JSON Schema compiler");
            if (key == "uniqueItems" && o[key] is JsonValue u && u.GetValueKind() == JsonValueKind.True)
                throw new GrammarException($"{path}: the keyword 'uniqueItems' is not supported by the JSON Schema compiler");
        }

        if (o["$ref"] is { } refNode)
        {
            var target = Resolve(refNode, path);
            if (!HasValidation(o, except: "$ref")) return RefTo(target, path + "/$ref");
            return ValueRx(Merge(WithoutKey(o, "$ref"), target, path), path);
        }
        if (o["allOf"] is JsonArray all)
        {
            JsonNode merged = WithoutKey(o, "allOf");
            for (int i = 0; i < all.Count; i++) merged = Merge(merged, all[i] ?? throw new GrammarException($"{path}/allOf/{i}: null"), $"{path}/allOf/{i}");
            return ValueRx(merged, path);
        }
        foreach (var kw in new[] { "anyOf", "oneOf" })
        {
            if (o[kw] is not JsonArray alts) continue;
            var rest = WithoutKey(o, kw);
            bool restMatters = HasValidation(rest, except: null);
            var branches = new List<JsonNode>();
            for (int i = 0; i < alts.Count; i++)
            {
                var alt = alts[i] ?? throw new GrammarException($"{path}/{kw}/{i}: null");
                branches.Add(restMatters ? Merge(rest, alt, $"{path}/{kw}/{i}") : alt);
            }
            if (kw == "oneOf") CheckDisjoint(branches, path);
            return Rx.Alt(branches.Select((br, i) => RefTo(br, $"{path}/{kw}/{i}")).ToArray());
        }

        var types = Types(o, path);
        if (o.ContainsKey("const"))
            return Literal(o["const"], path);
        if (o["enum"] is JsonArray values)
            return Rx.Alt(values.Where(v => types.Contains(TypeOf(v)) || (TypeOf(v) == "integer" && types.Contains("number")) || (TypeOf(v) == "number" && types.Contains("integer") && IsIntegral(v)))
                .Select(v => Literal(v, path)).ToArray());

        var parts = new List<Rx>();
        foreach (var t in types)
        {
            switch (t)
            {
                case "null": parts.Add(Rx.Literal("null")); break;
                case "boolean": parts.Add(Rx.Alt(Rx.Literal("true"), Rx.Literal("false"))); break;
                case "integer" or "number": parts.Add(Rx.Ref(Leaf(t, NumberRx(o, t == "integer", path)))); break;
                case "string": parts.Add(Rx.Ref(Leaf("string", StringRx(o, path)))); break;
                case "array": parts.Add(ArrayRx(o, path)); break;
                case "object": parts.Add(ObjectRx(o, path)); break;
            }
        }
        return Rx.Alt(parts.ToArray());
    }

    private static bool HasValidation(JsonObject o, string? except) =>
        o.Any(kv => kv.Key != except && (Handled.Contains(kv.Key) || Unsupported.Contains(kv.Key)));

    private static JsonObject WithoutKey(JsonObject o, string key)
    {
        var copy = new JsonObject();
        foreach (var (k, v) in o)
            if (k != key) copy[k] = v?.DeepClone();
        return copy;
    }

    private List<string> Types(JsonObject o, string path)
    {
        var t = o["type"];
        if (t is null) return [.. AllTypes];
        var list = t is JsonArray arr ? arr.Select(x => x?.GetValue<string>() ?? "").ToList() : [t.GetValue<string>()];
        foreach (var name in list)
            if (!AllTypes.Contains(name) && name != "integer") throw new GrammarException($"{path}: unknown type '{name}'");
        if (list.Contains("number")) list.Remove("integer");
        return list.Distinct().ToList();
    }

    private static string TypeOf(JsonNode? v) => v?.GetValueKind() switch
    {
        null or JsonValueKind.Null => "null",
        JsonValueKind.True or JsonValueKind.False => "boolean",
        JsonValueKind.String => "string",
        JsonValueKind.Number => IsIntegral(v) ? "integer" : "number",
        JsonValueKind.Array => "array",
        _ => "object",
    };

    private static bool IsIntegral(JsonNode? v) => v is JsonValue jv && jv.GetValueKind() == JsonValueKind.Number &&
        decimal.TryParse(jv.ToJsonString(), NumberStyles.Float, CultureInfo.InvariantCulture, out var d) && d == decimal.Truncate(d);

    private JsonNode Resolve(JsonNode refNode, string path)
    {
        var r = refNode.GetValue<string>();
        if (!r.StartsWith('#')) throw new GrammarException($"{path}: the remote reference '{r}' is not supported (only '#...' references within the schema)");
        JsonNode? cur = _root;
        foreach (var raw in r[1..].Split('/', StringSplitOptions.RemoveEmptyEntries))
        {
            var part = Uri.UnescapeDataString(raw).Replace("~1", "/").Replace("~0", "~");
            cur = cur switch
            {
                JsonObject obj when obj.TryGetPropertyValue(part, out var next) => next,
                JsonArray arr when int.TryParse(part, out int i) && i < arr.Count => arr[i],
                _ => throw new GrammarException($"{path}: the reference '{r}' points nowhere"),
            };
        }
        return cur ?? throw new GrammarException($"{path}: the reference '{r}' points to null");
    }

    // ---- allOf / $ref siblings: merging two schemas into one whose instances are those of both --------------------

    private JsonNode Merge(JsonNode a, JsonNode b, string path)
    {
        if (a is JsonValue va && va.GetValueKind() is JsonValueKind.True) return b;
        if (b is JsonValue vb && vb.GetValueKind() is JsonValueKind.True) return a;
        if (a is JsonValue fa && fa.GetValueKind() is JsonValueKind.False) return a;
        if (b is JsonValue fb && fb.GetValueKind() is JsonValueKind.False) return b;
        if (a is not JsonObject x || b is not JsonObject y) throw new GrammarException($"{path}: a schema must be an object or a boolean");
        if (y["$ref"] is { } ry) y = (JsonObject)Merge(WithoutKey(y, "$ref"), Resolve(ry, path), path);
        if (x["$ref"] is { } rx) x = (JsonObject)Merge(WithoutKey(x, "$ref"), Resolve(rx, path), path);
        if (y["allOf"] is JsonArray ya)
        {
            JsonNode m = WithoutKey(y, "allOf");
            foreach (var s in ya) m = Merge(m, s!, path);
            if (m is not JsonObject my) return m;
            y = my;
        }
        static bool Closed(JsonObject s) => s["additionalProperties"] is { } a && !(a is JsonValue v && v.GetValueKind() == JsonValueKind.True);
        if ((x.ContainsKey("patternProperties") && Closed(y)) || (y.ContainsKey("patternProperties") && Closed(x)))
            throw new GrammarException($"{path}: allOf combines patternProperties with another part's additionalProperties, which the JSON Schema compiler does not support");
        var result = (JsonObject)x.DeepClone();
        foreach (var (key, value) in y)
        {
            if (Annotations.Contains(key) || (!Handled.Contains(key) && !Unsupported.Contains(key) && key != "uniqueItems")) continue;
            if (!result.ContainsKey(key)) { result[key] = value?.DeepClone(); continue; }
            var mine = result[key];
            if (JsonNode.DeepEquals(mine, value)) continue;
            switch (key)
            {
                case "type":
                {
                    var t1 = TypeList(mine);
                    var t2 = TypeList(value);
                    var both = t1.Where(t => t2.Contains(t) || (t == "integer" && t2.Contains("number"))).Concat(t2.Where(t => t == "integer" && t1.Contains("number"))).Distinct().ToArray();
                    if (both.Length == 0) return JsonValue.Create(false);
                    result[key] = new JsonArray(both.Select(t => (JsonNode)JsonValue.Create(t)!).ToArray());
                    break;
                }
                case "required":
                    result[key] = new JsonArray(((JsonArray)mine!).Concat((JsonArray)value!).Select(n => n!.GetValue<string>()).Distinct().Select(s => (JsonNode)JsonValue.Create(s)!).ToArray());
                    break;
                case "minimum" or "minLength" or "minItems" or "exclusiveMinimum" when IsNumber(mine) && IsNumber(value):
                    result[key] = Number(mine!) >= Number(value!) ? mine!.DeepClone() : value!.DeepClone();
                    break;
                case "maximum" or "maxLength" or "maxItems" or "exclusiveMaximum" when IsNumber(mine) && IsNumber(value):
                    result[key] = Number(mine!) <= Number(value!) ? mine!.DeepClone() : value!.DeepClone();
                    break;
                case "enum":
                    result[key] = new JsonArray(((JsonArray)mine!).Where(m => ((JsonArray)value!).Any(v => JsonNode.DeepEquals(m, v))).Select(m => m!.DeepClone()).ToArray());
                    break;
                case "items" when mine is JsonObject or JsonValue && value is JsonObject or JsonValue:
                    result[key] = Both(mine!.DeepClone(), value!.DeepClone());
                    break;
                case "properties" or "additionalProperties":
                    break; // below, together
                case "anyOf" when mine is JsonArray ma && value is JsonArray va2:
                    // (a1 | a2) & (b1 | b2) = (a1 & b1) | (a1 & b2) | ...
                    result[key] = new JsonArray(ma.SelectMany(a => va2.Select(b => (JsonNode)Both(a!.DeepClone(), b!.DeepClone()))).ToArray());
                    break;
                default:
                    throw new GrammarException($"{path}: allOf combines two different '{key}' values, which the JSON Schema compiler does not support");
            }
        }
        if (x.ContainsKey("properties") || y.ContainsKey("properties") || x.ContainsKey("additionalProperties") || y.ContainsKey("additionalProperties"))
        {
            // Every name either part knows: each part's own schema for it, or that part's additionalProperties.
            var px = x["properties"] as JsonObject;
            var py = y["properties"] as JsonObject;
            JsonNode apx = x["additionalProperties"]?.DeepClone() ?? JsonValue.Create(true);
            JsonNode apy = y["additionalProperties"]?.DeepClone() ?? JsonValue.Create(true);
            var props = new JsonObject();
            foreach (var name in (px?.Select(kv => kv.Key) ?? []).Concat(py?.Select(kv => kv.Key) ?? []).Distinct())
            {
                var sx = px?[name]?.DeepClone() ?? apx.DeepClone();
                var sy = py?[name]?.DeepClone() ?? apy.DeepClone();
                props[name] = Both(sx, sy);
            }
            result["properties"] = props;
            result["additionalProperties"] = Both(apx, apy);
        }
        return result;
    }

    /// <summary>A schema for values valid under both, written without redundant wrappers (so merging the same pair again gives the same text).</summary>
    private static JsonNode Both(JsonNode a, JsonNode b)
    {
        static bool IsTrue(JsonNode n) => n is JsonValue v && v.GetValueKind() == JsonValueKind.True || n is JsonObject { Count: 0 };
        if (IsTrue(a) || JsonNode.DeepEquals(a, b)) return b;
        if (IsTrue(b)) return a;
        return new JsonObject { ["allOf"] = new JsonArray(a, b) };
    }

    private static List<string> TypeList(JsonNode? t) => t is JsonArray a ? a.Select(n => n!.GetValue<string>()).ToList() : [t!.GetValue<string>()];
    private static bool IsNumber(JsonNode? n) => n is JsonValue v && v.GetValueKind() == JsonValueKind.Number;
    private static decimal Number(JsonNode n) => decimal.Parse(n.ToJsonString(), NumberStyles.Float, CultureInfo.InvariantCulture);

    private void CheckDisjoint(List<JsonNode> branches, string path)
    {
        var sets = branches.Select(b => PossibleTypes(b, path, 0)).ToList();
        for (int i = 0; i < sets.Count; i++)
            for (int j = i + 1; j < sets.Count; j++)
            {
                var overlap = sets[i].Intersect(sets[j]).ToList();
                if (overlap.Count == 0) continue;
                if (overlap.All(t => t == "object") && Discriminated(branches[i], branches[j], path)) continue;
                throw new GrammarException($"{path}: oneOf alternatives {i} and {j} may both match a value of type {overlap[0]}; the JSON Schema compiler supports oneOf only with alternatives that cannot overlap (different types, or objects told apart by a required const/enum property)");
            }
    }

    private HashSet<string> PossibleTypes(JsonNode schema, string path, int depth)
    {
        if (depth > 20) return [.. AllTypes];
        if (schema is JsonValue v) return v.GetValueKind() == JsonValueKind.False ? [] : [.. AllTypes];
        var o = (JsonObject)schema;
        if (o["$ref"] is { } r && !HasValidation(o, "$ref")) return PossibleTypes(Resolve(r, path), path, depth + 1);
        if (o["const"] is { } c || o.ContainsKey("const")) return [Normal(TypeOf(o["const"]))];
        if (o["enum"] is JsonArray e) return e.Select(x => Normal(TypeOf(x))).ToHashSet();
        if (o["anyOf"] is JsonArray a1) return a1.SelectMany(x => PossibleTypes(x!, path, depth + 1)).ToHashSet();
        if (o["oneOf"] is JsonArray a2) return a2.SelectMany(x => PossibleTypes(x!, path, depth + 1)).ToHashSet();
        if (o["type"] is { } t) return TypeList(t).Select(Normal).ToHashSet();
        return [.. AllTypes];
    }

    private static string Normal(string t) => t == "integer" ? "number" : t;

    private bool Discriminated(JsonNode a, JsonNode b, string path)
    {
        JsonObject? Obj(JsonNode n) => n is JsonObject o ? (o["$ref"] is { } r && !HasValidation(o, "$ref") ? Resolve(r, path) as JsonObject : o) : null;
        var oa = Obj(a);
        var ob = Obj(b);
        if (oa?["properties"] is not JsonObject pa || ob?["properties"] is not JsonObject pb) return false;
        var ra = (oa["required"] as JsonArray)?.Select(n => n!.GetValue<string>()).ToHashSet() ?? [];
        var rb = (ob["required"] as JsonArray)?.Select(n => n!.GetValue<string>()).ToHashSet() ?? [];
        foreach (var (name, sa) in pa)
        {
            if (!ra.Contains(name) || !rb.Contains(name) || pb[name] is not { } sb) continue;
            var va = Values(sa);
            var vb = Values(sb);
            if (va is not null && vb is not null && !va.Any(x => vb.Any(y => JsonNode.DeepEquals(x, y)))) return true;
        }
        return false;

        static List<JsonNode?>? Values(JsonNode? s) => s is JsonObject o
            ? o.ContainsKey("const") ? [o["const"]] : o["enum"] is JsonArray e ? e.ToList() : null
            : null;
    }

    // ---- literals and any value --------------------------------------------------------------------------------------

    /// <summary>A JSON value written as <c>json.dumps</c> writes it (keys in order, non-ASCII kept), whitespace per style.</summary>
    private Rx Literal(JsonNode? v, string path) => v?.GetValueKind() switch
    {
        null or JsonValueKind.Null => Rx.Literal("null"),
        JsonValueKind.True => Rx.Literal("true"),
        JsonValueKind.False => Rx.Literal("false"),
        JsonValueKind.Number => NumberLiteral(v.ToJsonString()),
        JsonValueKind.String => Rx.Literal(PythonJsonString(v.GetValue<string>())),
        JsonValueKind.Array => ((JsonArray)v).Count == 0
            ? Rx.Seq(Rx.Byte((byte)'['), Ws, Rx.Byte((byte)']'))
            : Rx.Seq(Rx.Byte((byte)'['), Ws, Rx.Seq(((JsonArray)v).Select((x, i) => i == 0 ? Literal(x, path) : Rx.Seq(Comma, Literal(x, path))).ToArray()), Ws, Rx.Byte((byte)']')),
        _ => ((JsonObject)v).Count == 0
            ? Rx.Seq(Rx.Byte((byte)'{'), Ws, Rx.Byte((byte)'}'))
            : Rx.Seq(Rx.Byte((byte)'{'), Ws, Rx.Seq(((JsonObject)v).Select((kv, i) => Rx.Seq(i == 0 ? Rx.Empty : Comma, Rx.Literal(PythonJsonString(kv.Key)), Colon, Literal(kv.Value, path))).ToArray()), Ws, Rx.Byte((byte)'}')),
    };

    /// <summary>
    /// A number of an enum or const: equal values in the forms a writer produces (2 as <c>2</c> or <c>2.0</c>; other
    /// values as written and as Python's <c>repr</c> writes them, with trailing zeros).
    /// </summary>
    private static Rx NumberLiteral(string raw)
    {
        if (decimal.TryParse(raw, NumberStyles.Float, CultureInfo.InvariantCulture, out var d) && d == decimal.Truncate(d))
        {
            var digits = decimal.Truncate(d).ToString(CultureInfo.InvariantCulture);
            if (digits == "0" && raw.StartsWith('-')) digits = "-0";
            return Rx.Seq(Rx.Literal(digits), Rx.Optional(Rx.Seq(Rx.Byte((byte)'.'), Rx.Plus(Rx.Byte((byte)'0')))));
        }
        var repr = PythonJson.Number(raw);
        return Rx.Alt(Rx.Literal(raw), repr.Contains('e') ? Rx.Literal(repr) : Rx.Seq(Rx.Literal(repr), Rx.Star(Rx.Byte((byte)'0'))));
    }

    /// <summary>A string as Python's <c>json.dumps(ensure_ascii=False)</c> writes it.</summary>
    public static string PythonJsonString(string s)
    {
        var sb = new StringBuilder(s.Length + 2);
        Text.Templating.JinjaValues.WriteJsonString(sb, s, ensureAscii: false);
        return sb.ToString();
    }

    private int AnyValue()
    {
        if (_anyValue >= 0) return _anyValue;
        _anyValue = _g.Declare("any");
        int str = Leaf("string", AnyStringRx());
        int num = Leaf("number", JsonNumbers.AnyNumber);
        var obj = AnyObjectRx(); // refers back to this rule, declared above
        var arr = Rx.Seq(Rx.Byte((byte)'['), Ws, Rx.Optional(Rx.Seq(Rx.Ref(_anyValue), Rx.Star(Rx.Seq(Comma, Rx.Ref(_anyValue))))), Ws, Rx.Byte((byte)']'));
        _g.Define(_anyValue, Rx.Alt(Rx.Literal("null"), Rx.Literal("true"), Rx.Literal("false"), Rx.Ref(num), Rx.Ref(str), obj, arr));
        return _anyValue;
    }

    private Rx AnyObjectRx()
    {
        int any = AnyValue();
        int str = Leaf("string", AnyStringRx());
        var member = Rx.Seq(Rx.Ref(str), Colon, Rx.Ref(any));
        return Rx.Seq(Rx.Byte((byte)'{'), Ws, Rx.Optional(Rx.Seq(member, Rx.Star(Rx.Seq(Comma, member)))), Ws, Rx.Byte((byte)'}'));
    }

    private static Rx AnyStringRx() => Rx.Seq(Rx.Byte((byte)'"'), Rx.Star(CharSet.JsonAnyChar()), Rx.Byte((byte)'"'));

    // ---- strings, numbers ---------------------------------------------------------------------------------------------

    private static Rx StringRx(JsonObject o, string path)
    {
        int min = IntKeyword(o, "minLength", path) ?? 0;
        int? max = IntKeyword(o, "maxLength", path);
        if (max is { } mx && mx < min) return Rx.Nothing;
        var contents = new List<Rx>();
        if (min > 0 || max is not null) contents.Add(Rx.Repeat(CharSet.JsonAnyChar(), min, max ?? -1));
        if (o["pattern"] is { } p)
            contents.Add(RegexSyntax.Parse(p.GetValue<string>(), set => set.JsonChar(), search: true));
        if (o["format"] is { } f)
        {
            var name = f.GetValue<string>();
            if (Formats.TryGetValue(name, out var regex)) contents.Add(RegexSyntax.Parse(regex, set => set.JsonChar(), search: false));
            else if (UnsupportedFormats.Contains(name)) throw new GrammarException($"{path}: the string format '{name}' is not supported by the JSON Schema compiler");
        }
        Rx content = contents.Count switch
        {
            0 => Rx.Star(CharSet.JsonAnyChar()),
            1 => contents[0],
            _ => new DfaRx(contents.Select(RuleDfa.Compile).Aggregate(RuleDfa.Intersect)),
        };
        return Rx.Seq(Rx.Byte((byte)'"'), content, Rx.Byte((byte)'"'));
    }

    private static int? IntKeyword(JsonObject o, string key, string path)
    {
        if (o[key] is not { } n) return null;
        if (n is not JsonValue v || v.GetValueKind() != JsonValueKind.Number || !IsIntegral(n))
            throw new GrammarException($"{path}: '{key}' must be a non-negative integer");
        var d = Number(n);
        if (d < 0) throw new GrammarException($"{path}: '{key}' must be a non-negative integer");
        return d > 100_000 ? 100_000 : (int)d;
    }

    private static Rx NumberRx(JsonObject o, bool integer, string path)
    {
        BigInteger? lo = null, hi = null;
        bool loEx = false, hiEx = false;
        void Bound(string key, bool lower, bool exclusive)
        {
            if (o[key] is not { } n) return;
            if (n is JsonValue bv && bv.GetValueKind() is JsonValueKind.True or JsonValueKind.False)
            {
                // Draft 4: exclusiveMinimum/Maximum are booleans modifying minimum/maximum.
                if (bv.GetValueKind() == JsonValueKind.True)
                {
                    if (lower) loEx = true; else hiEx = true;
                }
                return;
            }
            if (!IsNumber(n)) throw new GrammarException($"{path}: '{key}' must be a number");
            var d = Number(n);
            BigInteger value;
            bool ex = exclusive;
            if (d != decimal.Truncate(d))
            {
                if (!integer) throw new GrammarException($"{path}: a non-integer '{key}' ({n.ToJsonString()}) on a number is not supported by the JSON Schema compiler");
                // For integers a fractional bound rounds inward and becomes inclusive.
                value = new BigInteger(lower ? decimal.Ceiling(d) : decimal.Floor(d));
                ex = false;
            }
            else value = new BigInteger(d);
            if (lower)
            {
                if (lo is null || value > lo || (value == lo && ex)) { lo = value; loEx = ex; }
            }
            else if (hi is null || value < hi || (value == hi && ex)) { hi = value; hiEx = ex; }
        }
        Bound("minimum", true, false);
        Bound("maximum", false, false);
        Bound("exclusiveMinimum", true, true);
        Bound("exclusiveMaximum", false, true);
        if (o["multipleOf"] is not { } m) return JsonNumbers.Bounded(lo, loEx, hi, hiEx, integer);
        // An integer multipleOf: integers divisible by it (a remainder automaton over the digits), within the
        // bounds; a number may add a zero fraction (2.0 is a multiple of 2).
        if (!IsNumber(m) || !IsIntegral(m) || Number(m) < 1 || Number(m) > 10_000)
            throw new GrammarException($"{path}: 'multipleOf' {m.ToJsonString()} is not supported by the JSON Schema compiler (only integers from 1 to 10000)");
        var ints = RuleDfa.Intersect(RuleDfa.Compile(JsonNumbers.Bounded(lo, loEx, hi, hiEx, integer: true)), RuleDfa.Compile(JsonNumbers.MultipleOf((int)Number(m))));
        return integer ? new DfaRx(ints) : Rx.Seq(new DfaRx(ints), Rx.Optional(Rx.Seq(Rx.Byte((byte)'.'), Rx.Plus(Rx.Byte((byte)'0')))));
    }

    // ---- arrays ---------------------------------------------------------------------------------------------------------

    private Rx ArrayRx(JsonObject o, string path)
    {
        int min = IntKeyword(o, "minItems", path) ?? 0;
        int? maxOpt = IntKeyword(o, "maxItems", path);
        int max = maxOpt ?? -1;
        if (max >= 0 && max < min) return Rx.Nothing;
        var prefix = new List<Rx>();
        JsonNode? rest;
        if (o["prefixItems"] is JsonArray pi)
        {
            prefix.AddRange(pi.Select((s, i) => RefTo(s, $"{path}/prefixItems/{i}")));
            rest = o["items"];
        }
        else if (o["items"] is JsonArray tuple)
        {
            prefix.AddRange(tuple.Select((s, i) => RefTo(s, $"{path}/items/{i}")));
            rest = o["additionalItems"];
        }
        else rest = o["items"];
        Rx restRx = rest is null ? Rx.Ref(AnyValue()) : RefTo(rest, $"{path}/items");

        // Items from position i on, each after a comma (the first without one).
        Rx From(int i)
        {
            if (max >= 0 && i >= max) return Rx.Empty;
            if (i >= prefix.Count)
            {
                if (restRx.IsNothing) return i >= min ? Rx.Empty : Rx.Nothing;
                int need = Math.Max(0, min - i);
                int upto = max < 0 ? -1 : max - i;
                if (i == 0)
                {
                    var list = Rx.Seq(restRx, Rx.Repeat(Rx.Seq(Comma, restRx), Math.Max(0, need - 1), upto < 0 ? -1 : upto - 1));
                    return need > 0 ? list : Rx.Optional(list);
                }
                return Rx.Repeat(Rx.Seq(Comma, restRx), need, upto);
            }
            var item = Rx.Seq(i == 0 ? Rx.Empty : Comma, prefix[i], From(i + 1));
            return i < min ? item : Rx.Optional(item);
        }
        return Rx.Seq(Rx.Byte((byte)'['), Ws, From(0), Ws, Rx.Byte((byte)']'));
    }

    // ---- objects --------------------------------------------------------------------------------------------------------

    /// <summary>Above this many required properties, properties keep the schema's order even under validator semantics.</summary>
    private const int MaxRequiredForAnyOrder = 4;

    private Rx ObjectRx(JsonObject o, string path)
    {
        var properties = o["properties"] as JsonObject ?? [];
        var required = (o["required"] as JsonArray)?.Select(n => n!.GetValue<string>()).ToHashSet() ?? [];
        var ap = o["additionalProperties"];
        var patternProps = o["patternProperties"] as JsonObject ?? [];
        bool apAllowed = ap is not JsonValue av || av.GetValueKind() != JsonValueKind.False;
        bool unlisted = apAllowed && !(ap is null && _strict);
        int minProperties = IntKeyword(o, "minProperties", path) ?? 0;
        if (minProperties > 1) throw new GrammarException($"{path}: 'minProperties' above 1 is not supported by the JSON Schema compiler");
        if (o.ContainsKey("maxProperties")) throw new GrammarException($"{path}: the keyword 'maxProperties' is not supported by the JSON Schema compiler");

        // patternProperties: each pattern's keys (that are no listed name and match no other pattern) with its schema.
        var patterns = patternProps.Select(kv => (Key: kv.Key, Dfa: RuleDfa.Compile(RegexSyntax.Parse(kv.Key, set => set.JsonChar(), search: true)), Schema: kv.Value)).ToList();
        var names = properties.Select(kv => kv.Key).Concat(required).Distinct().ToList();

        var props = new List<(string Name, Rx Value, bool Required)>();
        foreach (var (name, schema) in properties)
        {
            // A listed name that also matches a pattern must satisfy both schemas.
            JsonNode node = schema ?? throw new GrammarException($"{path}/properties/{name}: null");
            foreach (var pt in patterns.Where(pt => Matches(pt.Dfa, name)))
                node = Both(node.DeepClone(), pt.Schema!.DeepClone());
            var value = RefTo(node, $"{path}/properties/{name}");
            bool req = required.Contains(name);
            if (value.IsNothing)
            {
                if (req) return Rx.Nothing;
                continue; // a property that can never be valid is simply never written
            }
            props.Add((name, value, req));
        }
        foreach (var name in required.Where(n => !properties.ContainsKey(n)))
        {
            var matching = patterns.Where(pt => Matches(pt.Dfa, name)).ToList();
            Rx value;
            if (matching.Count > 0) value = RefTo(matching.Skip(1).Aggregate(matching[0].Schema!.DeepClone(), (acc, pt) => Both(acc, pt.Schema!.DeepClone())), $"{path}/patternProperties");
            else if (!apAllowed) return Rx.Nothing;
            else value = ap is null ? Rx.Ref(AnyValue()) : RefTo(ap, $"{path}/additionalProperties");
            props.Add((name, value, true));
        }

        var extras = new List<Rx>();
        var namesRx = names.Select(n => Rx.Literal(PythonJsonString(n)[1..^1])).ToList();
        for (int i = 0; i < patterns.Count; i++)
        {
            var value = RefTo(patterns[i].Schema, $"{path}/patternProperties");
            if (value.IsNothing) continue;
            var excluded = namesRx.Concat(patterns.Where((_, j) => j != i).Select(pt => (Rx)new DfaRx(pt.Dfa))).ToArray();
            var keys = excluded.Length == 0 ? patterns[i].Dfa : RuleDfa.Difference(patterns[i].Dfa, RuleDfa.Compile(Rx.Alt(excluded)));
            extras.Add(Rx.Seq(Rx.Ref(Leaf("key", Rx.Seq(Rx.Byte((byte)'"'), new DfaRx(keys), Rx.Byte((byte)'"')))), Colon, value));
        }
        if (unlisted)
        {
            var apValue = ap is null ? Rx.Ref(AnyValue()) : RefTo(ap, $"{path}/additionalProperties");
            var excluded = namesRx.Concat(patterns.Select(pt => (Rx)new DfaRx(pt.Dfa))).ToArray();
            if (!apValue.IsNothing) extras.Add(Rx.Seq(Rx.Ref(Leaf("key", ExtraKey(excluded))), Colon, apValue));
        }
        Rx? extra = extras.Count == 0 ? null : Rx.Alt(extras.ToArray());

        var requiredProps = props.Where(p => p.Required).ToList();
        GraphRx body = !_strict && requiredProps.Count <= MaxRequiredForAnyOrder && props.Count > 1
            ? AnyOrder(props, extra, minProperties)
            : SchemaOrder(props, extra, minProperties);
        return Rx.Seq(Rx.Byte((byte)'{'), Ws, body, Ws, Rx.Byte((byte)'}'));
    }

    private Rx Member(string name, Rx value) => Rx.Seq(Rx.Literal(PythonJsonString(name)), Colon, value);

    /// <summary>Properties in the schema's order, each at most once, required ones present; extras anywhere.</summary>
    private GraphRx SchemaOrder(List<(string Name, Rx Value, bool Required)> props, Rx? extra, int minProperties)
    {
        // F_i (nothing written yet, next candidate i) = node i; R_i (something written) = node n+1+i.
        int n = props.Count;
        int F(int i) => i;
        int R(int i) => n + 1 + i;
        var edges = new List<(int, Rx, int)>();
        for (int i = 0; i < n; i++)
        {
            var (name, value, req) = props[i];
            var member = Member(name, value);
            edges.Add((F(i), member, R(i + 1)));
            edges.Add((R(i), Rx.Seq(Comma, member), R(i + 1)));
            if (!req)
            {
                edges.Add((F(i), Rx.Empty, F(i + 1)));
                edges.Add((R(i), Rx.Empty, R(i + 1)));
            }
        }
        if (extra is not null)
            for (int i = 0; i <= n; i++)
            {
                edges.Add((F(i), extra, R(i)));
                edges.Add((R(i), Rx.Seq(Comma, extra), R(i)));
            }
        return new GraphRx(2 * (n + 1), edges.ToArray(), minProperties > 0 ? [R(n)] : [F(n), R(n)]);
    }

    /// <summary>
    /// Properties in any order (JSON Schema's semantics: a validator does not read order), tracking only which
    /// required ones have been written (so at most 2^4 states of progress); extras anywhere.
    /// </summary>
    private GraphRx AnyOrder(List<(string Name, Rx Value, bool Required)> props, Rx? extra, int minProperties)
    {
        var reqIndex = props.Where(p => p.Required).Select((p, i) => (p.Name, i)).ToDictionary(x => x.Name, x => x.i);
        int masks = 1 << reqIndex.Count;
        int Node(int mask, bool first) => mask * 2 + (first ? 0 : 1);
        var edges = new List<(int, Rx, int)>();
        for (int mask = 0; mask < masks; mask++)
            foreach (bool first in new[] { true, false })
            {
                foreach (var (name, value, req) in props)
                {
                    int next = req ? mask | (1 << reqIndex[name]) : mask;
                    var member = Member(name, value);
                    edges.Add((Node(mask, first), first ? member : Rx.Seq(Comma, member), Node(next, false)));
                }
                if (extra is not null) edges.Add((Node(mask, first), first ? extra : Rx.Seq(Comma, extra), Node(mask, false)));
            }
        // Node 0 is the start: mask 0, nothing written.
        int full = masks - 1;
        return new GraphRx(masks * 2, edges.ToArray(), minProperties > 0 ? [Node(full, false)] : [Node(full, true), Node(full, false)]);
    }

    /// <summary>Whether the JSON-string content of <paramref name="name"/> is in <paramref name="dfa"/>'s language.</summary>
    private static bool Matches(RuleDfa dfa, string name)
    {
        int state = 0;
        foreach (byte b in Encoding.UTF8.GetBytes(PythonJsonString(name)[1..^1]))
        {
            state = dfa.Step(state, b);
            if (state < 0) return false;
        }
        return dfa.Accept[state];
    }

    /// <summary>
    /// A key that is none of the <paramref name="excluded"/> key contents. Keys are written in the canonical encoding
    /// (escapes only where JSON needs them, as json.dumps writes them), so a name cannot hide behind another spelling.
    /// </summary>
    private static Rx ExtraKey(Rx[] excluded)
    {
        var any = Rx.Star(CharSet.Any.JsonChar());
        Rx content = excluded.Length == 0 ? any : new DfaRx(RuleDfa.Difference(RuleDfa.Compile(any), RuleDfa.Compile(Rx.Alt(excluded))));
        return Rx.Seq(Rx.Byte((byte)'"'), content, Rx.Byte((byte)'"'));
    }
}
