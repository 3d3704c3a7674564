using System.Collections.Concurrent;

namespace LocalVllm.Engine.Structured;

/// <summary>
/// Compiles a <see cref="StructuredOutputs"/> into a <see cref="CompiledGrammar"/>, once per distinct constraint
/// (the cache is keyed by the constraint's text and options, so every agent call with the same schema reuses it).
/// Thread-safe: requests are validated on the callers' threads.
/// </summary>
public static class ConstraintCompiler
{
    private const int MaxCached = 512;
    private static readonly ConcurrentDictionary<string, Lazy<CompiledGrammar>> Cache = new();

    /// <summary>The grammar of <paramref name="constraint"/>; a <see cref="GrammarException"/> (an <see cref="ArgumentException"/>) names what cannot be compiled.</summary>
    public static CompiledGrammar Compile(StructuredOutputs constraint)
    {
        ArgumentNullException.ThrowIfNull(constraint);
        _ = constraint.Kind; // exactly one kind
        if (Cache.Count > MaxCached) Cache.Clear();
        var lazy = Cache.GetOrAdd(constraint.CacheKey, _ => new Lazy<CompiledGrammar>(() => Build(constraint)));
        try
        {
            return lazy.Value;
        }
        catch
        {
            Cache.TryRemove(constraint.CacheKey, out _);
            throw;
        }
    }

    private static CompiledGrammar Build(StructuredOutputs c)
    {
        bool compact = c.Whitespace == JsonWhitespace.Compact;
        string kind = c.Kind;
        Grammar g;
        switch (kind)
        {
            case "json":
                g = JsonSchemaGrammar.Build(c.Json!, compact, c.StrictJson);
                break;
            case "json_object":
                g = JsonSchemaGrammar.AnyJson(objectOnly: true, compact);
                break;
            case "regex":
                g = new Grammar();
                g.Add("regex", RegexSyntax.Parse(c.Regex!, set => set.Utf8(), search: false));
                break;
            case "choice":
                if (c.Choice!.Count == 0) throw new GrammarException("the choice constraint lists no strings");
                g = new Grammar();
                g.Add("choice", Rx.Alt(c.Choice.Select(Rx.Literal).ToArray()));
                break;
            default:
                g = GbnfGrammar.Parse(c.Grammar!, compact, c.StrictJson);
                break;
        }
        if (c.ReasoningEnd is not null)
        {
            // After the reasoning ends, the model usually writes a blank line before the constrained part.
            var ws = Rx.Star(Rx.Ranges([((byte)' ', (byte)' '), ((byte)'\t', (byte)'\n'), ((byte)'\r', (byte)'\r')]));
            g.Start = g.Add("after-reasoning", Rx.Seq(ws, Rx.Ref(g.Start)));
        }
        return g.Compile(Describe(c, kind));
    }

    private static string Describe(StructuredOutputs c, string kind) => kind switch
    {
        "json" => "the JSON schema",
        "json_object" => "the JSON object constraint",
        "regex" => $"the regular expression /{c.Regex}/",
        "choice" => "the choice constraint",
        _ => "the grammar",
    };
}
