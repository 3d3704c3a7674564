using System.Text.Json.Nodes;
using LocalVllm.Engine.Text.Templating;

namespace LocalVllm.Engine.Tests;

/// <summary>Six real chat templates rendered exactly as transformers' apply_chat_template renders them (renders.json).</summary>
public sealed class ChatTemplateTests
{
    private static readonly string Dir = Path.Combine(Fixtures.Root, "tokenizers", "chat_templates");

    public static TheoryData<string, string> Cases()
    {
        var data = new TheoryData<string, string>();
        var renders = JsonNode.Parse(File.ReadAllText(Path.Combine(Dir, "renders.json")))!["templates"]!.AsObject();
        foreach (var (file, t) in renders)
            foreach (var c in t!["cases"]!.AsArray())
                data.Add(file, c!["name"]!.GetValue<string>());
        return data;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Renders_exactly_as_transformers(string file, string caseName)
    {
        var t = JsonNode.Parse(File.ReadAllText(Path.Combine(Dir, "renders.json")))!["templates"]![file]!;
        var c = t["cases"]!.AsArray().First(x => x!["name"]!.GetValue<string>() == caseName)!;
        var special = t["special_tokens"]!.AsObject().ToDictionary(kv => kv.Key, kv => kv.Value!.GetValue<string>());
        var template = new ChatTemplate(File.ReadAllText(Path.Combine(Dir, file)), special);
        var extra = c["extra_context"]?.AsObject().ToDictionary(kv => kv.Key, kv => kv.Value?.DeepClone());
        string Render() => template.Render(c["messages"]!.AsArray(), c["tools"]?.AsArray(), c["add_generation_prompt"]!.GetValue<bool>(), extra);
        if (c["expected_error"] is JsonNode error)
            Assert.Equal(error.GetValue<string>(), Assert.Throws<TemplateRaisedException>(Render).Message);
        else
            Assert.Equal(c["expected"]!.GetValue<string>(), Render());
    }

    [Fact]
    public void The_qwen3_fixture_loads_its_template_from_tokenizer_config_and_reproduces_the_reference_prompts()
    {
        var template = ChatTemplate.Load(Fixtures.Model("tiny-qwen3-chat"))!;
        foreach (var c in Fixtures.Reference("tiny-qwen3-chat")["cases"]!.AsArray())
        {
            var extra = new Dictionary<string, JsonNode?> { ["enable_thinking"] = c!["enable_thinking"]!.DeepClone() };
            Assert.Equal(c["prompt_text"]!.GetValue<string>(),
                template.Render(c["messages"]!.AsArray(), c["tools"]?.AsArray(), c["add_generation_prompt"]!.GetValue<bool>(), extra));
        }
    }

    [Theory]
    [InlineData("{% for x in y %}", "endfor", 1, 4)] // the opening keyword of the unclosed block
    [InlineData("hello\n{{ x | frobnicate }}", "frobnicate", 2, 8)] // the unknown filter's name
    [InlineData("{% macro %}", "expected Name", 1, 10)] // where the macro's name should be
    [InlineData("a\n  {% include 'x' %}", "include", 2, 6)] // the unsupported keyword
    public void Unsupported_constructs_name_themselves_with_a_position(string source, string construct, int line, int column)
    {
        var e = Assert.Throws<TemplateException>(() => new ChatTemplate(source).Render([]));
        Assert.StartsWith($"Chat template error at line {line}, column {column}: ", e.Message);
        Assert.Contains(construct, e.Message);
    }

    [Fact]
    public void Whitespace_control_follows_trim_blocks_and_lstrip_blocks()
    {
        var t = new JinjaTemplate("A\n  {% if true %}\n  B\n  {% endif %}\nC {{- ' D ' -}} E\n{# note #}\nF");
        Assert.Equal("A\n  B\nC D E\nF", t.Render(new Dictionary<string, object?>()));
    }

    /// <summary>
    /// EngineOptions.ChatTemplate (vLLM's --chat-template) on a base model without a template: TinyLlama's real template,
    /// given as a file and as its text, renders what transformers renders (the stories260K tokenizer has TinyLlama's
    /// special tokens), and replaces a model's own template.
    /// </summary>
    [Fact]
    public void A_replacement_template_from_a_file_or_inline_renders_as_transformers_and_takes_the_models_place()
    {
        const string file = "TinyLlama-TinyLlama-1.1B-Chat-v1.0.jinja";
        var path = Path.Combine(Dir, file);
        var cases = JsonNode.Parse(File.ReadAllText(Path.Combine(Dir, "renders.json")))!["templates"]![file]!["cases"]!.AsArray();
        Assert.Null(ChatTemplate.Load(Fixtures.Model("stories260K")));
        foreach (var replacement in new[] { path, File.ReadAllText(path) })
        {
            using var llm = new Llm(EngineHarness.Options("stories260K", o => o.ChatTemplate = replacement));
            var template = llm.Engine.ChatTemplate!;
            foreach (var c in cases.Where(c => c!["expected"] is not null))
                Assert.Equal(c!["expected"]!.GetValue<string>(), template.Render(c["messages"]!.AsArray(), c["tools"]?.AsArray(), c["add_generation_prompt"]!.GetValue<bool>()));
        }
        using var qwen = new Llm(EngineHarness.Options("tiny-qwen3-chat", o => o.ChatTemplate = path));
        Assert.Equal(File.ReadAllText(path), qwen.Engine.ChatTemplate!.Source);
    }

    [Fact]
    public void A_replacement_template_that_is_no_file_or_does_not_parse_is_refused_by_name()
    {
        var missing = Path.Combine(Path.GetTempPath(), "no-such-template.jinja");
        var e = Assert.Throws<FileNotFoundException>(() => new Llm(EngineHarness.Options("stories260K", o => o.ChatTemplate = missing)));
        Assert.Contains(missing, e.Message);
        var bad = Assert.Throws<InvalidDataException>(() => new Llm(EngineHarness.Options("stories260K", o => o.ChatTemplate = "{% for m in messages %}{{ m.content }}")));
        Assert.Contains("EngineOptions.ChatTemplate does not parse", bad.Message);
        Assert.Contains("endfor", bad.Message);
    }
}
