using System.Globalization;
using System.Text.Json.Nodes;
using LocalVllm.Engine.Text.Templating;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// Constructs real chat templates use, rendered by jinja2 itself in transformers' environment
/// (eng/fixtures/templates/make_jinja2_renders.py wrote TemplateCases/jinja2-renders.json): our interpreter must give
/// the same text, or, where jinja2 raised, an error that names the same thing.
/// </summary>
public sealed class TemplateCorpusTests
{
    // Read once per run, not once per case.
    private static readonly Lazy<JsonObject> CorpusFile = new(() =>
        (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "TemplateCases", "jinja2-renders.json")))!);
    private static JsonObject Corpus => CorpusFile.Value;

    public static TheoryData<string> CaseNames => new(Corpus["cases"]!.AsArray().Select(c => c!["name"]!.GetValue<string>()));

    [Theory]
    [MemberData(nameof(CaseNames))]
    public void Renders_as_jinja2_renders(string name)
    {
        var c = Corpus["cases"]!.AsArray().Single(x => x!["name"]!.GetValue<string>() == name)!;
        var context = ((Dictionary<string, object?>)JinjaValues.FromJson(c["context"])!);
        var now = DateTime.Parse(c["now"]!.GetValue<string>(), CultureInfo.InvariantCulture);
        var template = new JinjaTemplate(c["template"]!.GetValue<string>());
        if (c["error"] is { } error)
        {
            // jinja2's message, e.g. "UndefinedError: 'no_such_function' is undefined": ours must name the same thing.
            var e = Assert.Throws<TemplateException>(() => template.Render(context, now));
            var what = error.GetValue<string>();
            Assert.Contains(what[(what.IndexOf(": ", StringComparison.Ordinal) + 2)..], e.Message);
            return;
        }
        Assert.Equal(c["expected"]!.GetValue<string>(), template.Render(context, now));
    }

    /// <summary>
    /// The same comparison on a corpus made outside the repository (real model templates rendered by jinja2, in the
    /// same file format), named by LOCALVLLM_TEMPLATE_CORPUS; skipped when it is not set. Model templates are not
    /// committed here: they are other projects' files.
    /// </summary>
    [SkippableTheory]
    [MemberData(nameof(ExternalCaseNames))]
    public void Renders_a_real_template_as_jinja2_renders(string name)
    {
        Skip.If(ExternalCorpus is null, "LOCALVLLM_TEMPLATE_CORPUS is not set: no external template corpus to compare with.");
        var c = ExternalCorpus!["cases"]!.AsArray().Single(x => x!["name"]!.GetValue<string>() == name)!;
        var context = (Dictionary<string, object?>)JinjaValues.FromJson(c["context"])!;
        var now = DateTime.Parse(c["now"]!.GetValue<string>(), CultureInfo.InvariantCulture);
        if (c["error"] is { } error)
        {
            var what = error.GetValue<string>();
            var e = Assert.ThrowsAny<Exception>(() => new JinjaTemplate(c["template"]!.GetValue<string>()).Render(context, now));
            // A syntax error must be one (its wording is the parser's); any other must say what jinja2 says.
            if (what.StartsWith("TemplateSyntaxError", StringComparison.Ordinal)) Assert.IsType<TemplateException>(e);
            else Assert.Contains(what[(what.IndexOf(": ", StringComparison.Ordinal) + 2)..], e.Message);
            return;
        }
        Assert.Equal(c["expected"]!.GetValue<string>(), new JinjaTemplate(c["template"]!.GetValue<string>()).Render(context, now));
    }

    private static readonly Lazy<JsonObject?> ExternalCorpusFile = new(() =>
        Environment.GetEnvironmentVariable("LOCALVLLM_TEMPLATE_CORPUS") is { Length: > 0 } path
            ? (JsonObject)JsonNode.Parse(File.ReadAllText(path))!
            : null);
    private static JsonObject? ExternalCorpus => ExternalCorpusFile.Value;

    public static TheoryData<string> ExternalCaseNames =>
        ExternalCorpus is { } corpus ? new(corpus["cases"]!.AsArray().Select(c => c!["name"]!.GetValue<string>())) : new("(no external corpus)");

    [Fact]
    public void Json_integers_stay_integers_and_fractions_floats_as_in_Python()
    {
        // A tool schema's "maxItems": 3 must render as 3, not 3.0 (a long/double conditional once made it a double).
        Assert.Equal(3L, JinjaValues.FromJson(JsonValue.Create(3L)));
        Assert.Equal(3L, JinjaValues.FromJson(JsonNode.Parse("3")));
        Assert.Equal(-7L, JinjaValues.FromJson(JsonNode.Parse("-7")));
        Assert.Equal(2.0, JinjaValues.FromJson(JsonNode.Parse("2.0")));
        Assert.Equal(1000.0, JinjaValues.FromJson(JsonNode.Parse("1e3")));
        var tools = new JsonArray { new JsonObject { ["type"] = "function", ["function"] = new JsonObject { ["name"] = "f", ["parameters"] = new JsonObject { ["maxItems"] = 3 } } } };
        Assert.Equal("""{"type": "function", "function": {"name": "f", "parameters": {"maxItems": 3}}}""",
            new ChatTemplate("{{ tools[0]|tojson }}").Render([], tools));
    }

    [Fact]
    public void The_corpus_covers_every_construct_it_was_made_for()
    {
        // A guard against an accidentally truncated corpus file: these cases must all be present.
        string[] required = ["strftime_now", "undefined_function", "generation_tag", "filter_block", "indent", "sort", "format_filter_and_percent",
            "loop_cycle", "power", "exponent_literals", "tuple_set", "string_escapes", "tojson_options", "safe_concatenation_escapes_the_plain_string",
            "python_str_of_containers", "python_whitespace", "final_newline_dropped", "crlf_becomes_lf", "length_counts_code_points",
            "dictsort_is_case_insensitive", "macros_do_not_see_loop_variables", "abs_of_negative", "recursive_loop"];
        Assert.Empty(required.Except(Corpus["cases"]!.AsArray().Select(c => c!["name"]!.GetValue<string>())));
    }
}
