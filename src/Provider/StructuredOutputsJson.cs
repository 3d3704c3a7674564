using System.Text.Json;
using System.Text.Json.Nodes;
using LocalVllm.Engine;

namespace LocalVllm;

/// <summary>
/// vLLM's request fields for constrained decoding, read into <see cref="StructuredOutputs"/>: the object
/// <c>structured_outputs</c> (<c>json</c>, <c>regex</c>, <c>choice</c>, <c>grammar</c>, <c>json_object</c>,
/// <c>disable_any_whitespace</c>) and the older top-level <c>guided_json</c>, <c>guided_regex</c>,
/// <c>guided_choice</c>, <c>guided_grammar</c>. Used by the server and by <c>ChatOptions.AdditionalProperties</c>.
/// </summary>
public static class StructuredOutputsJson
{
    /// <summary>The older top-level field names that vLLM still reads.</summary>
    public static readonly string[] GuidedFields = ["guided_json", "guided_regex", "guided_choice", "guided_grammar"];

    /// <summary>A <c>structured_outputs</c> object as a constraint; an <see cref="ArgumentException"/> names a malformed field.</summary>
    public static StructuredOutputs Parse(JsonNode? node)
    {
        if (node is not JsonObject o) throw new ArgumentException("structured_outputs must be an object with one of json, regex, choice, grammar or json_object.");
        StructuredOutputs c = new();
        foreach (var (key, value) in o)
        {
            c = key switch
            {
                "json" => c with { Json = value is JsonValue s && s.GetValueKind() == JsonValueKind.String ? s.GetValue<string>() : value?.ToJsonString() },
                "regex" => c with { Regex = Text(value, key) },
                "choice" => c with { Choice = value is JsonArray a ? a.Select(x => Text(x, key)).ToArray() : throw new ArgumentException("structured_outputs.choice must be an array of strings.") },
                "grammar" => c with { Grammar = Text(value, key) },
                "json_object" => c with { JsonObject = value?.GetValue<bool>() ?? false },
                "disable_any_whitespace" => c with { Whitespace = value?.GetValue<bool>() == false ? JsonWhitespace.Flexible : JsonWhitespace.Compact },
                "whitespace_pattern" or "disable_additional_properties" or "disable_fallback" or "structural_tag" or "backend" =>
                    throw new ArgumentException($"structured_outputs.{key} is not supported."),
                _ => throw new ArgumentException($"structured_outputs.{key} is not a known field; use json, regex, choice, grammar or json_object."),
            };
        }
        _ = c.Kind; // exactly one
        return c;
    }

    /// <summary>
    /// The constraint as a <c>structured_outputs</c> object, the form vLLM and the LocalVllm server read
    /// (<see cref="Parse"/> reads it back to an equal constraint): a JSON schema goes as an object, whitespace inside
    /// JSON as <c>disable_any_whitespace</c> (written either way, since vLLM's default allows whitespace and ours does
    /// not). <see cref="StructuredOutputs.ReasoningEnd"/> is not written: a server applies its own reasoning parser.
    /// <see cref="StructuredOutputs.StrictJson"/> false has no field there: a <see cref="NotSupportedException"/>.
    /// </summary>
    public static JsonObject ToJson(StructuredOutputs c)
    {
        string kind = c.Kind; // exactly one, or an ArgumentException
        if (!c.StrictJson)
            throw new NotSupportedException("StructuredOutputs.StrictJson = false has no field in vLLM's structured_outputs; a server reads a schema strictly (unlisted properties only where the schema allows them).");
        var o = new JsonObject();
        switch (kind)
        {
            case "json":
                JsonNode? schema;
                try { schema = JsonNode.Parse(c.Json!); }
                catch (JsonException) { schema = c.Json; } // sent as it is: the server names what is wrong with it
                o["json"] = schema;
                break;
            case "json_object": o["json_object"] = true; break;
            case "regex": o["regex"] = c.Regex; break;
            case "choice": o["choice"] = new JsonArray(c.Choice!.Select(x => (JsonNode?)x).ToArray()); break;
            default: o["grammar"] = c.Grammar; break;
        }
        if (kind is "json" or "json_object" or "grammar") o["disable_any_whitespace"] = c.Whitespace == JsonWhitespace.Compact;
        return o;
    }

    /// <summary>
    /// <c>AdditionalProperties["structured_outputs"]</c> as a constraint: a <see cref="StructuredOutputs"/>, or vLLM's
    /// object as a <see cref="JsonNode"/> or <see cref="JsonElement"/>; null when the key is absent.
    /// </summary>
    public static StructuredOutputs? FromAdditionalProperty(object? value) => value switch
    {
        null => null,
        StructuredOutputs given => given,
        JsonElement e => Parse(JsonNode.Parse(e.GetRawText())),
        JsonNode n => Parse(n),
        _ => throw new ArgumentException($"AdditionalProperties[\"structured_outputs\"] must be a StructuredOutputs or vLLM's structured_outputs object, not {value.GetType().Name}."),
    };

    /// <summary>A constraint from the older <c>guided_*</c> fields of <paramref name="body"/>, or null when none is set.</summary>
    public static StructuredOutputs? FromGuidedFields(JsonObject body)
    {
        var o = new JsonObject();
        foreach (var f in GuidedFields)
            if (body[f] is { } v) o[f["guided_".Length..]] = v.DeepClone();
        return o.Count == 0 ? null : Parse(o);
    }

    private static string Text(JsonNode? v, string key) =>
        v is JsonValue s && s.GetValueKind() == JsonValueKind.String ? s.GetValue<string>() : throw new ArgumentException($"structured_outputs.{key} must be a string.");
}
