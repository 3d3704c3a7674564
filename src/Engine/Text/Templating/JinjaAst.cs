namespace LocalVllm.Engine.Text.Templating;

internal abstract record Node(int Line, int Column);

// Statements
internal sealed record TextNode(string Text, int Line, int Column) : Node(Line, Column);
internal sealed record OutputNode(Expr Value, int Line, int Column) : Node(Line, Column);
internal sealed record IfNode(List<(Expr Condition, List<Node> Body)> Branches, List<Node>? Else, int Line, int Column) : Node(Line, Column);
internal sealed record ForNode(List<string> Targets, Expr Iterable, Expr? Filter, List<Node> Body, List<Node>? Else, int Line, int Column, bool Recursive = false) : Node(Line, Column);
/// <summary><c>{% set name = v %}</c>, <c>{% set ns.attr = v %}</c> or, with several <see cref="Targets"/>, <c>{% set a, b = pair %}</c>.</summary>
internal sealed record SetNode(string Name, string? Attribute, Expr Value, int Line, int Column, List<string>? Targets = null) : Node(Line, Column);
/// <summary><c>{% filter f(args) | g %}body{% endfilter %}</c>: the rendered body passed through the filters.</summary>
internal sealed record FilterBlockNode(List<(string Name, List<Expr> Args, List<(string Name, Expr Value)> Kwargs, int Line, int Column)> Filters, List<Node> Body, int Line, int Column) : Node(Line, Column);
/// <summary>transformers' <c>{% generation %}body{% endgeneration %}</c> (marks assistant text): renders its body.</summary>
internal sealed record GenerationNode(List<Node> Body, int Line, int Column) : Node(Line, Column);
internal sealed record SetBlockNode(string Name, List<Node> Body, int Line, int Column) : Node(Line, Column);
internal sealed record BreakNode(int Line, int Column) : Node(Line, Column);
internal sealed record ContinueNode(int Line, int Column) : Node(Line, Column);
internal sealed record MacroNode(string Name, List<(string Name, Expr? Default)> Parameters, List<Node> Body, int Line, int Column) : Node(Line, Column);

// Expressions
internal abstract record Expr(int Line, int Column) : Node(Line, Column);
internal sealed record Literal(object? Value, int Line, int Column) : Expr(Line, Column);
internal sealed record NameExpr(string Name, int Line, int Column) : Expr(Line, Column);
internal sealed record ListExpr(List<Expr> Items, int Line, int Column, bool IsTuple = false) : Expr(Line, Column);
internal sealed record DictExpr(List<(Expr Key, Expr Value)> Items, int Line, int Column) : Expr(Line, Column);
internal sealed record AttrExpr(Expr Target, string Name, int Line, int Column) : Expr(Line, Column);
internal sealed record IndexExpr(Expr Target, Expr Index, int Line, int Column) : Expr(Line, Column);
internal sealed record SliceExpr(Expr Target, Expr? Start, Expr? Stop, Expr? Step, int Line, int Column) : Expr(Line, Column);
internal sealed record CallExpr(Expr Target, List<Expr> Args, List<(string Name, Expr Value)> Kwargs, int Line, int Column) : Expr(Line, Column);
internal sealed record FilterExpr(Expr Target, string Name, List<Expr> Args, List<(string Name, Expr Value)> Kwargs, int Line, int Column) : Expr(Line, Column);
internal sealed record TestExpr(Expr Target, string Name, List<Expr> Args, bool Negated, int Line, int Column) : Expr(Line, Column);
internal sealed record UnaryExpr(string Op, Expr Operand, int Line, int Column) : Expr(Line, Column);
internal sealed record BinaryExpr(string Op, Expr Left, Expr Right, int Line, int Column) : Expr(Line, Column);
internal sealed record CondExpr(Expr Condition, Expr Then, Expr? Else, int Line, int Column) : Expr(Line, Column);
