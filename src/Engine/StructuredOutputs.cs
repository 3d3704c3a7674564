namespace LocalVllm.Engine;

/// <summary>Where a JSON constraint lets whitespace appear.</summary>
public enum JsonWhitespace
{
    /// <summary>
    /// None at all (<c>{"a":1}</c>): the default for generation, so a weak model cannot spend its tokens on whitespace
    /// (it could otherwise emit newlines forever inside an object) and every token goes to content.
    /// </summary>
    Compact,
    /// <summary>Any JSON whitespace wherever JSON allows it (what a validator accepts; MaskBench's <c>", "</c> and <c>": "</c>).</summary>
    Flexible,
}

/// <summary>
/// A constraint on what a request may generate (vLLM's structured outputs): exactly one of <see cref="Json"/>,
/// <see cref="JsonObject"/>, <see cref="Regex"/>, <see cref="Choice"/> or <see cref="Grammar"/>. It is compiled once
/// per distinct constraint into a byte-level grammar; every step, each sequence's matcher masks the tokens that cannot
/// continue a match before sampling, and EOS is allowed only where the match is complete. An invalid or unsupported
/// constraint is an <see cref="ArgumentException"/> when the request is added.
/// </summary>
public sealed record StructuredOutputs
{
    /// <summary>A JSON Schema (as JSON text) the output must be a valid instance of.</summary>
    public string? Json { get; init; }

    /// <summary>Any JSON object.</summary>
    public bool JsonObject { get; init; }

    /// <summary>A regular expression the whole output must match (ECMAScript syntax; no lookaround or backreferences).</summary>
    public string? Regex { get; init; }

    /// <summary>The output must be exactly one of these strings.</summary>
    public IReadOnlyList<string>? Choice { get; init; }

    /// <summary>
    /// A context-free grammar in GBNF (llama.cpp's notation: <c>root ::= ...</c>, string literals, character classes,
    /// rule references, groups, <c>| * + ? {m,n}</c>), extended with <c>%json{ schema }</c> for a JSON Schema value.
    /// </summary>
    public string? Grammar { get; init; }

    /// <summary>Whitespace inside JSON (for <see cref="Json"/>, <see cref="JsonObject"/> and <c>%json</c>).</summary>
    public JsonWhitespace Whitespace { get; init; } = JsonWhitespace.Compact;

    /// <summary>
    /// True (the default, for generation): an object whose schema does not mention <c>additionalProperties</c> gets
    /// only the properties it lists, as XGrammar's strict mode and OpenAI's strict schemas do; otherwise a model could
    /// invent keys forever. False: JSON Schema's own semantics (unlisted properties allowed), as a validator and
    /// MaskBench read a schema. An explicit <c>additionalProperties</c> is always honoured.
    /// </summary>
    public bool StrictJson { get; init; } = true;

    /// <summary>
    /// A text that ends a reasoning section (Qwen3's <c>&lt;/think&gt;</c>): when set, the output is free until this
    /// text has been generated, and the constraint applies after it (whitespace may separate them), as vLLM's reasoning
    /// parsers do. Null: the constraint applies from the first token.
    /// </summary>
    public string? ReasoningEnd { get; init; }

    /// <summary>A JSON Schema constraint.</summary>
    public static StructuredOutputs ForJsonSchema(string schema, JsonWhitespace whitespace = JsonWhitespace.Compact) =>
        new() { Json = schema, Whitespace = whitespace };

    /// <summary>Any JSON object.</summary>
    public static StructuredOutputs ForJsonObject(JsonWhitespace whitespace = JsonWhitespace.Compact) =>
        new() { JsonObject = true, Whitespace = whitespace };

    /// <summary>A regular-expression constraint.</summary>
    public static StructuredOutputs ForRegex(string regex) => new() { Regex = regex };

    /// <summary>One of the given strings.</summary>
    public static StructuredOutputs ForChoice(params string[] choices) => new() { Choice = choices };

    /// <summary>A GBNF grammar.</summary>
    public static StructuredOutputs ForGrammar(string grammar) => new() { Grammar = grammar };

    /// <summary>The cache key: the kind, its text and the options.</summary>
    internal string CacheKey =>
        $"{Whitespace}|{StrictJson}|{ReasoningEnd}|" + (Json is not null ? "json:" + Json
            : JsonObject ? "object"
            : Regex is not null ? "regex:" + Regex
            : Choice is not null ? "choice:" + string.Join("\u0000", Choice)
            : "grammar:" + Grammar);

    /// <summary>Which constraint is set (json, json_object, regex, choice or grammar); an <see cref="ArgumentException"/> when none or several are.</summary>
    public string Kind
    {
        get
        {
            int count = (Json is not null ? 1 : 0) + (JsonObject ? 1 : 0) + (Regex is not null ? 1 : 0) + (Choice is not null ? 1 : 0) + (Grammar is not null ? 1 : 0);
            if (count != 1)
                throw new ArgumentException($"StructuredOutputs needs exactly one of Json, JsonObject, Regex, Choice or Grammar ({count} set).", "sampling.StructuredOutputs");
            return Json is not null ? "json" : JsonObject ? "json_object" : Regex is not null ? "regex" : Choice is not null ? "choice" : "grammar";
        }
    }
}
